"""The DPO stage's data: preference shards streamed into collated batches.

What it guarantees:

- **Streaming.** Pairs are read line by line from the shards; what is held in memory is the list of
  (shard, line) positions of usable pairs, never the pairs or their images.
- **A scan before training** checks every pair (bad pairs: a clear error or a counted skip, as
  ``on_bad_pair`` says), tokenises it through the chat template with its image, and drops — counted — the
  pairs that exceed ``max_length`` (``too_long``) or whose image + prompt alone would (``prompt_too_long``:
  truncation would cut image tokens, so we never truncate). The scan is cached on disk by (shards' content,
  processor and template, max_length) so sweep jobs share it.
- **Held-out validation** (``val_fraction`` of the pairs by a seeded hash of their ids, or ``val_path``) and a
  **nested training fraction** (``fraction``; the 9% subset lies inside 25%, inside 50%); the selected ids
  are written to the run directory.
- **Exactly once per epoch across DDP ranks x dataloader workers.** In each epoch's order (shards shuffled
  with the seed and the epoch), the k-th usable pair goes to slot ``k mod (world x workers)``; every slot is
  padded to the same length with zero-weight repeats, so all ranks run the same number of steps and the
  padding changes no loss or metric. A seeded shuffle buffer, different every epoch, mixes each slot.
- **Resumable mid-epoch.** The train loader has ``state_dict``/``load_state_dict`` (Lightning stores them in
  ``last.ckpt``): a resumed run skips the batches it already trained on, without loading their images.
- **Collation** renders the question with the processor's chat template; labels only on answer tokens (+ end
  of turn); chosen and rejected share the image (processed once) and the prompt, whose token length is
  passed on (``prompt_lengths``) so the DPO step can run it once.

One module per concern, each importable on its own (this file imports nothing, so ``encoding`` or ``scan``
do not pull in Lightning):

- :mod:`.settings` — :class:`~.settings.PreferenceDataSettings` (the ``data`` config group);
- :mod:`.encoding` — one pair through the chat template (:func:`~.encoding.encode_pair`), its image processed
  once for both answers;
- :mod:`.scan` — token lengths without processing images, the checked and measured scan of every shard, its
  on-disk cache and the content fingerprints that key it and the reference cache;
- :mod:`.collate` — :class:`~.collate.PairCollator`: pairs into one batch dict;
- :mod:`.stream` — :class:`~.stream.PreferenceBatches` (one rank x worker slot of an epoch) and the resumable
  :class:`~.stream.PreferenceLoader`;
- :mod:`.datamodule` — :class:`~.datamodule.PreferenceDataModule`: scan, split, select, loaders.

(The pair record and its shard format are :mod:`stllava_med.data.preference`, which stays torch-free for the
judge.)
"""
