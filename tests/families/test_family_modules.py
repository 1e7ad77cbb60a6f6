"""Module layout per family, on one tiny real model each: LoRA targets (language model, and the vision tower
with ``lora.vision``), learning-rate groups (the projector at its own rate), full fine-tuning (vision tower
frozen), and the merged export (reloads with the adapter model's logits and our chat template).

The family's regular expressions are checked against an independent, hand-written map of each family's
modules (``VISION`` / ``PROJECTOR`` below, read off the transformers classes), so a wrong pattern in a family
module fails here rather than silently training the wrong weights."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from families.builders import FAMILIES
from families.conftest import mixed_images
from stllava_med.chat import ChatFormat, Turn, encode, prompt_text
from stllava_med.families import family_of

pytestmark = [pytest.mark.families, pytest.mark.usefixtures("one_thread")]

# Parameter-name prefixes in the bare model (``<Family>ForConditionalGeneration``).
VISION = {
    "llava15": ("model.vision_tower.",),
    "sq_llava": ("model.vision_tower.",),
    "llava_mistral": ("model.vision_tower.",),
    "llava_next": ("model.vision_tower.",),
    "qwen2_5_vl": ("model.visual.",),  # minus the merger, which is the projector
    "idefics3": ("model.vision_model.",),
    "gemma3": ("model.vision_tower.",),
}
PROJECTOR = {
    "llava15": ("model.multi_modal_projector.",),
    "sq_llava": ("model.multi_modal_projector.",),  # the cluster module and its MLP
    "llava_mistral": ("model.multi_modal_projector.",),
    "llava_next": ("model.multi_modal_projector.",),  # image_newline: frozen under LoRA (families/llava_next.py)
    "qwen2_5_vl": ("model.visual.merger.",),
    "idefics3": ("model.connector.",),
    "gemma3": ("model.multi_modal_projector.",),
}
LANGUAGE_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT_PREFIX = "base_model.model."
CONVERSATION = [
    Turn("user", "Is there a fracture?"),
    Turn("assistant", "no"),
    Turn("questioner", "Where is the lesion located?"),
    Turn("assistant", "left upper lobe"),
]


def _bare(name: str) -> str:
    return name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name


def _clean(name: str) -> str:
    """A peft parameter name as the bare model's (``base_layer`` / ``modules_to_save.default`` removed)."""
    name = _bare(name)
    for piece in (".base_layer", ".modules_to_save.default", ".original_module"):
        name = name.replace(piece, "")
    return name


def _is_vision(family: str, name: str) -> bool:
    name = _clean(name)
    return name.startswith(VISION[family]) and not _is_projector(family, name)


def _is_projector(family: str, name: str) -> bool:
    return _clean(name).startswith(PROJECTOR[family])


def _load(path, *, lora: bool = True, **settings):
    """The family's backbone, with a LoRA adapter (``backbone.lora`` = ``settings``) unless ``lora=False``."""
    from stllava_med.backbone import load_backbone

    cfg = {"name_or_path": str(path), "name": path.name}
    if lora:
        cfg["lora"] = {"enabled": True, **settings}
    return load_backbone(cfg)


def _batch(backbone, image):
    from stllava_med.data.sft_datamodule import collate_sft
    from stllava_med.families import processor_family

    processor = backbone.processor
    enc = encode(processor, CONVERSATION, ChatFormat(), image)
    item = {"uid": "x", "input_ids": enc.input_ids, "labels": enc.labels, "target_role": enc.target_role,
            "pixel_values": enc.pixel_values, "extra": enc.extra, "family": processor_family(processor).name,
            "questioner_turns": 1, "dropped_pairs": 0}
    batch = collate_sft([item], processor.tokenizer.pad_token_id)
    return {k: v for k, v in batch.items() if k not in ("target_role", "uids", "questioner_turns", "dropped_pairs")}


def _lora_modules(model) -> list[str]:
    return [_bare(n) for n, m in model.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)]


def _layer(name: str) -> int:
    return int(re.search(r"\.(?:layers|blocks)\.(\d+)\.", name).group(1))


def test_family_patterns_match_the_module_map(family, family_backbone):
    """The family's vision / projector predicates agree with the hand-written map on every parameter."""
    model = family_backbone.model
    fam = family_of(model)
    names = [n for n, _ in model.named_parameters()]
    assert any(_is_vision(family, n) for n in names) and any(_is_projector(family, n) for n in names)
    for prefix in PROJECTOR[family]:
        assert any(n.startswith(prefix) for n in names), prefix
    assert [n for n in names if fam.is_vision_parameter(n)] == [n for n in names if _is_vision(family, n)]
    assert [n for n in names if fam.is_projector_parameter(n)] == [n for n in names if _is_projector(family, n)]


# ---- 6. LoRA targets -------------------------------------------------------------------------------------


def test_lora_wraps_the_language_model(family, family_path):
    backbone = _load(family_path)
    model = backbone.model
    fam = family_of(model)
    bare = model.get_base_model()
    wrapped = _lora_modules(model)
    text_layers = bare.config.get_text_config().num_hidden_layers
    assert len(wrapped) == len(LANGUAGE_PROJECTIONS) * text_layers
    for name in wrapped:
        assert re.fullmatch(fam.lora_targets, name), name
        assert name.rsplit(".", 1)[1] in LANGUAGE_PROJECTIONS, name
        assert not _is_vision(family, name + ".weight") and not fam.is_vision_parameter(name + ".weight"), name
        assert not _is_projector(family, name + ".weight"), name
    # every projection of every text layer, exactly once
    assert sorted((_layer(n), n.rsplit(".", 1)[1]) for n in wrapped) == sorted(
        (layer, p) for layer in range(text_layers) for p in LANGUAGE_PROJECTIONS)
    # LoRA weights train, the base weights do not (the projector is the trainable modules_to_save copy)
    for name, param in model.named_parameters():
        if "lora_" in name:
            assert param.requires_grad, name
        elif not (fam.is_projector_parameter(name) and ".modules_to_save." in name):
            assert not param.requires_grad, name


def test_vision_lora_wraps_the_tower_and_gets_gradients(family, family_path):
    backbone = _load(family_path, vision=True, dropout=0.0)
    model = backbone.model
    fam = family_of(model)
    bare = model.get_base_model()
    wrapped = _lora_modules(model)
    vision = [n for n in wrapped if fam.is_vision_parameter(n + ".weight")]
    language = [n for n in wrapped if n not in vision]
    assert len(language) == len(LANGUAGE_PROJECTIONS) * bare.config.get_text_config().num_hidden_layers
    assert all(re.fullmatch(fam.lora_targets, n) for n in language)
    # every linear layer of every vision encoder block (as the bare model has them), and nothing else
    fresh = _load(family_path, lora=False).model
    expected = sorted(n for n, m in fresh.named_modules() if isinstance(m, nn.Linear) and _is_vision(family, n + ".x"))
    assert expected and all(re.search(r"\.(?:layers|blocks)\.\d+\.", n) for n in expected)
    assert sorted(vision) == expected
    assert all(re.fullmatch(fam.vision_lora_targets, n) for n in vision)

    # one backward: LoRA B of every vision block the model reads gets a gradient (A's is zero while B = 0).
    # transformers initialises Gemma 3's mm_input_projection_weight to zeros, so a freshly built tiny Gemma
    # passes no gradient to its tower at all: give an all-zero projector weight random values first.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and fam.is_projector_parameter(name) and param.ndim >= 2 and not param.any():
                param.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(0))
    model.train()
    loss = model(**_batch(backbone, mixed_images()[1]), use_cache=False).loss
    loss.backward()
    vision_config = bare.config.vision_config
    depth = getattr(vision_config, "num_hidden_layers", None) or vision_config.depth
    feature_layer = getattr(bare.config, "vision_feature_layer", -1)
    # LLaVA reads hidden_states[vision_feature_layer] (-2: the blocks after it never reach the loss)
    used = depth + feature_layer + 1 if feature_layer < 0 else feature_layer
    assert used >= 1
    modules = dict(model.named_modules())
    with_grad = set()
    for name in vision:
        weight = modules[PEFT_PREFIX + name].lora_B["default"].weight
        if weight.grad is not None and weight.grad.abs().sum() > 0:
            with_grad.add(name)
    assert with_grad == {n for n in vision if _layer(n) < used}


# ---- 7. learning-rate groups -----------------------------------------------------------------------------


def test_lr_groups_put_the_projector_at_its_rate(family, family_path):
    from stllava_med.training import param_groups

    backbone = _load(family_path)
    model = backbone.model
    fam = family_of(model)
    groups = param_groups(model, lr=1e-4, projector_lr=2e-5)
    assert {g["lr"] for g in groups} == {1e-4, 2e-5}
    at_projector_lr = {id(p) for g in groups if g["lr"] == 2e-5 for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    trainable_projector = {id(p) for n, p in model.named_parameters()
                           if p.requires_grad and fam.is_projector_parameter(n)}
    assert at_projector_lr == trainable_projector, sorted(names[i] for i in at_projector_lr ^ trainable_projector)
    assert all(_is_projector(family, names[i]) for i in at_projector_lr)
    # every other trainable parameter is LoRA, at the base rate
    others = [names[id(p)] for g in groups if g["lr"] == 1e-4 for p in g["params"]]
    assert others and all("lora_" in n and not fam.is_projector_parameter(n) for n in others)
    # the projector module(s) train: a trainable copy of each of their parameters (Qwen's visual.merger,
    # Idefics3's connector, LLaVA's and Gemma's multi_modal_projector)
    modules = [p for p in PROJECTOR[family] if p.endswith(".")]
    in_modules = {_clean(n) for n, _ in model.named_parameters() if _clean(n).startswith(tuple(modules))}
    trained = {_clean(names[i]) for i in trainable_projector}
    assert in_modules and in_modules <= trained, sorted(in_modules - trained)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_projector_parameter_trains_under_lora(family, family_path):
    model = _load(family_path).model
    fam = family_of(model)
    projector = {_clean(n) for n, _ in model.named_parameters() if fam.is_projector_parameter(n)}
    trained = {_clean(n) for n, p in model.named_parameters() if p.requires_grad and fam.is_projector_parameter(n)}
    assert projector and trained == projector, sorted(projector - trained)


# ---- 8. full fine-tuning ---------------------------------------------------------------------------------


def test_full_finetune_freezes_exactly_the_vision_tower(family, family_backbone):
    from stllava_med.train_sft import unfreeze_for_full_finetune

    model = family_backbone.model
    count = unfreeze_for_full_finetune(model)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and frozen == [n for n, _ in model.named_parameters() if _is_vision(family, n)]
    assert all(p.requires_grad for n, p in model.named_parameters() if _is_projector(family, n))
    assert count == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert unfreeze_for_full_finetune(model, train_vision=True) == sum(p.numel() for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())


# ---- 9. merged export ------------------------------------------------------------------------------------


def test_export_merged_reloads_with_adapter_logits(family, family_path, tmp_path):
    from stllava_med.backbone import export_merged, load_backbone
    from stllava_med.families.processor_loading import load_processor_components

    backbone = _load(family_path)
    model, processor = backbone.model, backbone.processor
    fam = family_of(model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # make the merge and the trained projector copy matter
        for name, param in model.named_parameters():
            if "lora_B" in name or (".modules_to_save." in name and param.requires_grad):
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    model.eval()
    batch = _batch(backbone, mixed_images()[0])
    batch.pop("labels")
    with torch.no_grad():
        adapted = model(**batch, use_cache=False).logits
        with model.disable_adapter():
            base = model(**batch, use_cache=False).logits
    assert (adapted - base).abs().max() > 1e-3  # the export below is not a no-op

    out = export_merged(model, processor, tmp_path / "merged", adapter_dir=tmp_path / "adapter")
    reloaded = load_backbone({"name_or_path": str(out), "name": "merged"})
    assert not hasattr(reloaded.model, "peft_config")
    # a plain checkpoint of the base architecture: no LoRA or modules_to_save leftovers
    assert set(reloaded.model.state_dict()) == set(_load(family_path, lora=False).model.state_dict())
    reloaded.model.eval()
    with torch.no_grad():
        merged = reloaded.model(**batch, use_cache=False).logits
    torch.testing.assert_close(merged, adapted, atol=1e-4, rtol=0)

    # the saved processor carries the chat template the family renders with (ours where we have one)
    saved = load_processor_components(str(out))
    assert saved.chat_template == processor.chat_template
    ours = fam.chat_template(model.get_base_model().config)
    if ours is not None:
        assert saved.chat_template == ours
    fmt = ChatFormat()
    for history, role in ((CONVERSATION[:1], "assistant"), (CONVERSATION[:2], "questioner")):
        assert prompt_text(reloaded.processor, history, role, fmt) == prompt_text(processor, history, role, fmt)
