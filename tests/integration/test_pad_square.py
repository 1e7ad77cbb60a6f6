"""image_aspect_ratio=pad: LLaVA's expand2square on real, non-square VQA-RAD images (pixel-exact), and every
stage that loads images applies it: SFT items, DPO batches and length scans, evaluation predictions and
generated candidates equal those of the same images padded beforehand (and differ from the unpadded ones)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from stllava_med.chat import ChatFormat
from stllava_med.data.images import image_preparer, mean_colour, pad_to_square
from stllava_med.data.vqa import VQARecord, load_image

WIDE = "synpic16407.jpg"   # 1024 x 842
TALL = "synpic13385.jpg"   # 987 x 1200
CLIP_MEAN_COLOUR = (122, 116, 104)  # tuple(int(x * 255) for x in OPENAI_CLIP_MEAN), LLaVA's background


@pytest.fixture(scope="module")
def processor(tiny_backbone_path):
    from stllava_med.backbone import load_processor

    return load_processor(str(tiny_backbone_path))


def _expected(image: Image.Image, fill) -> np.ndarray:
    """expand2square written out with numpy: the long side's square of ``fill``, the image centred at
    ``(long - short) // 2`` along the short side."""
    pixels = np.asarray(image)
    h, w = pixels.shape[:2]
    side = max(h, w)
    out = np.empty((side, side, 3), dtype=np.uint8)
    out[:] = np.asarray(fill, dtype=np.uint8)
    top, left = (side - h) // 2, (side - w) // 2
    out[top:top + h, left:left + w] = pixels
    return out


@pytest.mark.parametrize(("name", "size", "offset"), [(WIDE, (1024, 842), (0, 91)), (TALL, (987, 1200), (106, 0))])
def test_pad_to_square_is_pixel_exact(sample_dir, processor, name, size, offset):
    image = load_image(sample_dir / "images" / name)
    assert image.size == size
    fill = mean_colour(processor)
    assert fill == CLIP_MEAN_COLOUR
    padded = pad_to_square(image, fill)
    side = max(size)
    assert padded.size == (side, side) and padded.mode == "RGB"
    assert np.array_equal(np.asarray(padded), _expected(image, fill))
    left, top = offset
    assert np.array_equal(np.asarray(padded.crop((left, top, left + size[0], top + size[1]))), np.asarray(image))
    assert padded.getpixel((0, 0)) == CLIP_MEAN_COLOUR and padded.getpixel((side - 1, side - 1)) == CLIP_MEAN_COLOUR
    square = image.crop((0, 0, 500, 500))
    assert pad_to_square(square, fill) is square
    assert image_preparer(processor, "keep")(image) is image
    with pytest.raises(ValueError, match="image_aspect_ratio must be one of"):
        image_preparer(processor, "square")


def _pixels(processor, image) -> torch.Tensor:
    return processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]


def test_sft_items_are_padded(sample_dir, processor):
    from stllava_med.data.instruct import InstructRecord, Message
    from stllava_med.data.sft_datamodule import SFTDataset

    path = sample_dir / "images" / WIDE
    record = InstructRecord(id="w", image=str(path), dataset="t",
                            messages=(Message("human", "Is this a chest film?"), Message("gpt", "yes")))
    image = load_image(path)
    padded = _pixels(processor, pad_to_square(image, CLIP_MEAN_COLOUR))
    items = {mode: SFTDataset([record], processor, ChatFormat(), sq_ratio=0.0, seed=0, max_length=None,
                              image_aspect_ratio=mode)[(0, 0)] for mode in ("keep", "pad")}
    assert torch.equal(items["pad"]["pixel_values"], padded)
    assert torch.equal(items["keep"]["pixel_values"], _pixels(processor, image))
    assert not torch.equal(items["pad"]["pixel_values"], items["keep"]["pixel_values"])
    assert torch.equal(items["pad"]["input_ids"], items["keep"]["input_ids"])


def test_dpo_batches_and_length_scan_are_padded(sample_dir, processor, tmp_path):
    from stllava_med.data.pairs.collate import PairCollator, PairItem
    from stllava_med.data.pairs.encoding import encode_pair, once_processor
    from stllava_med.data.pairs.scan import PairLengths, PairMeasurer, processor_fingerprint
    from stllava_med.data.preference import PreferencePair

    path = sample_dir / "images" / TALL
    pair = PreferencePair(id="p", images=[str(path)], prompt="Is there a mass?", chosen="no", rejected="yes, large")
    shard = tmp_path / "pairs.jsonl"
    padded_image = pad_to_square(load_image(path), CLIP_MEAN_COLOUR)
    batch = PairCollator(processor, ChatFormat(), image_aspect_ratio="pad")([PairItem(pair, shard)])
    assert torch.equal(batch["pixel_values"], _pixels(processor, padded_image))
    keep = PairCollator(processor, ChatFormat())([PairItem(pair, shard)])
    assert not torch.equal(batch["pixel_values"], keep["pixel_values"])
    full, _ = once_processor(processor)
    for check_every in (1, 10**9):  # the full encode, and the fast measurement (header size, padded square)
        measurer = PairMeasurer(processor, ChatFormat(), check_every=check_every, image_aspect_ratio="pad")
        measurer.count = 1  # past the first-pair check
        assert measurer.measure(pair, [path]) == PairLengths.of(encode_pair(full, ChatFormat(), pair, padded_image))
    # padded pixels change the reference log-probs: the cache key says so
    assert processor_fingerprint(processor, ChatFormat(), "pad") != processor_fingerprint(processor, ChatFormat())


def _padded_copy(src, tmp_path) -> str:
    out = tmp_path / (src.stem + "-padded.png")  # lossless: the same pixels as padding in memory
    pad_to_square(load_image(src), CLIP_MEAN_COLOUR).save(out)
    return str(out)


def test_evaluation_pads(sample_dir, tiny_backbone, tmp_path):
    from stllava_med.eval.vqa import predict

    questions = ["Is there a fracture?", "Where is the lesion?"]
    images = [sample_dir / "images" / WIDE, sample_dir / "images" / TALL]

    def records(paths):
        return [VQARecord(id=str(i), image=str(p), question=q, answer="no", answer_type="OPEN", dataset="t",
                          split="test") for i, (p, q) in enumerate(zip(paths, questions))]

    fmt = ChatFormat()
    run = {}
    for label, recs, mode in (("pad", records(images), "pad"),
                              ("prepadded", records([_padded_copy(p, tmp_path) for p in images]), "keep")):
        rows, _ = predict(tiny_backbone, recs, fmt, tmp_path / f"{label}.jsonl", batch_size=2, max_new_tokens=4,
                          progress=False, image_aspect_ratio=mode)
        run[label] = [r["text"] for r in rows]
    assert run["pad"] == run["prepadded"]


def test_generation_pads(sample_dir, tiny_backbone, tmp_path):
    from stllava_med.schema import Sampling
    from stllava_med.selftrain.generate import (
        GenerationSettings,
        GivenQuestion,
        ImageTask,
        generate_candidates,
    )
    from stllava_med.utils.io import read_jsonl

    original = sample_dir / "images" / WIDE
    answers = {}
    for label, path, mode in (("pad", str(original), "pad"), ("prepadded", _padded_copy(original, tmp_path), "keep")):
        task = ImageTask(path=path, image_id="same-seed", questions=[GivenQuestion("Is there a fracture?", "no",
                                                                                   "CLOSED", "0")])
        settings = GenerationSettings(question_source="dataset", questions_per_image=1, answers_per_question=2,
                                      image_aspect_ratio=mode, progress=False, max_answer_rounds=0,
                                      answer=Sampling(temperature=1.0, top_k=50, top_p=0.95, max_new_tokens=4))
        summary = generate_candidates(tiny_backbone, ChatFormat(), [task], settings, tmp_path / label)
        assert summary["images_done"] == 1
        answers[label] = [row["answers"] for shard in sorted((tmp_path / label / "candidates").glob("*.jsonl"))
                          for row in read_jsonl(shard)]
    assert answers["pad"] and answers["pad"] == answers["prepadded"]
    with pytest.raises(ValueError, match="generate.image_aspect_ratio must be one of"):
        GenerationSettings(image_aspect_ratio="square")
