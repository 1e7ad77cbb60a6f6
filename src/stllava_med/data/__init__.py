"""Data: medical VQA records and loaders (:mod:`.vqa`; answer types in :mod:`.answers`), stage-1
conversations (:mod:`.instruct`, :mod:`.sft_datamodule`), preference pairs and their shards
(:mod:`.preference`), the DPO stage's streaming data (:mod:`.pairs`) and nested training fractions
(:mod:`.fraction`)."""
