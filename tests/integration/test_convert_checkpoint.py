"""``python -m stllava_med.convert_checkpoint``: original-layout LLaVA / LLaVA-Med / SQ-LLaVA / STLLaVA-Med
checkpoints into Hugging Face directories.

Each case writes a tiny checkpoint exactly as the official code saves one — ``config.json`` with the official
``mm_*`` fields and model type (``llava`` / ``llava_mistral``), random weights under the official names
(``model.layers.*``, ``model.mm_projector.*``, ``model.vision_tower.vision_tower.vision_model.*`` where the
vision tower is saved with it), safetensors shards with an index (or ``.bin``), a tokenizer trained offline
without ``<image>`` — or the split parts STLLaVA-Med releases (LLM, ViT, projector ``mm_projector.bin``). After
conversion the converted model's logits (float64) are compared with the original forward computed here from the
original tensors: the CLIP vision tower written out by hand (its state at ``mm_vision_select_layer`` -2, CLS
dropped), the projector written out by hand (``mlp2x_gelu``; SQ-LLaVA's ``Clustering`` in the official code's
own order of operations), the image features spliced at the ``<image>`` position of the official
``tokenizer_image_token`` ids, and the text model as ``LlavaLlamaForCausalLM`` / ``LlavaMistralForCausalLM`` run
it (their Llama / Mistral base classes loaded with the original keys, strictly). The converted directories then
load through ``stllava_med.backbone.load_backbone``, generate (greedy, first token = the original's argmax),
train a few SFT-LoRA steps (projector at its own learning rate, cluster parameters included) and give DPO
log-probs on the fast path equal to the per-sequence forward."""

from __future__ import annotations

import json
import math
import sys
import warnings
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread")]

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "tests"))
from families.builders.common import seeded, train_tokenizer  # noqa: E402
from stllava_med.convert_checkpoint import SYSTEM_PROMPTS, ConversionError, convert, main  # noqa: E402

PATCH = 14
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, patch_size=PATCH,
              projection_dim=16, hidden_act="quick_gelu", layer_norm_eps=1e-5)
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=4096, rms_norm_eps=1e-5, hidden_act="silu", initializer_range=0.02,
            bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, use_cache=True)
QUESTION = "What organ is shown in this image?"
ANSWER = "The liver, with a lesion in the right lobe."
ATOL = 1e-9  # float64 end to end: what remains is summation order


# --------------------------------------------------------------------------------------------------------------
# Tiny checkpoints in the official layout
# --------------------------------------------------------------------------------------------------------------


def original_tokenizer(pad_token: str | None):
    """A Llama / Mistral-style tokenizer as the original checkpoints ship one: ``<unk> <s> </s>`` ids 0-2, bos
    added, no ``<image>`` (the official code splices images at the id -200, never a token)."""
    kwargs = {"pad_token": pad_token} if pad_token else {}
    return train_tokenizer(["<unk>", "<s>", "</s>"], vocab_size=1000, bos_token="<s>", eos_token="</s>",
                           unk_token="<unk>", add_bos_token=True, add_eos_token=False, **kwargs)


def vision_config(image_size: int):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(image_size=image_size, **VISION)


def clip_vision_state(image_size: int, seed: int) -> dict[str, torch.Tensor]:
    """A CLIP vision model's weights under the names transformers 4.x (and the hub's CLIP files) use:
    ``vision_model.embeddings...``, ``vision_model.encoder.layers.N...``."""
    from transformers import CLIPVisionModel

    with seeded(seed):
        model = CLIPVisionModel(vision_config(image_size))
        state = {f"vision_model.{k}": v.detach().clone() for k, v in model.state_dict().items()}
        # trained CLIP weights are not at their init values: move the norms and biases too
        for value in state.values():
            if value.is_floating_point():
                value.add_(torch.randn_like(value) * 0.02)
    return state


def projector_state(kind: str, channels: int, hidden: int, seed: int) -> dict[str, torch.Tensor]:
    """``model.mm_projector.*`` as the official modules name their parameters."""
    gen = torch.Generator().manual_seed(seed)

    def linear(name: str, n_in: int, n_out: int) -> dict[str, torch.Tensor]:
        bound = 1 / math.sqrt(n_in)
        return {f"{name}.weight": (torch.rand(n_out, n_in, generator=gen) * 2 - 1) * bound,
                f"{name}.bias": (torch.rand(n_out, generator=gen) * 2 - 1) * bound}

    if kind == "mlp2x_gelu":  # nn.Sequential(Linear, GELU, Linear)
        parts = {**linear("0", channels, hidden), **linear("2", hidden, hidden)}
    else:  # Clustering(channels, hidden, 256, 2)
        parts = {"sim_alpha": torch.full((1, 1, 1), 1.3), "sim_beta": torch.full((1, 1, 1), -0.2),
                 **linear("c", channels, channels), **linear("v", channels, channels),
                 **linear("f", channels, channels),
                 "ln_1.weight": torch.ones(channels), "ln_1.bias": torch.zeros(channels),
                 **linear("mlp.0", channels, hidden), **linear("mlp.2", hidden, hidden)}
    return {f"model.mm_projector.{k}": v for k, v in parts.items()}


def language_state(text: str, vocab: int, seed: int) -> dict[str, torch.Tensor]:
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    config_cls, model_cls = (MistralConfig, MistralForCausalLM) if text == "mistral" else (LlamaConfig,
                                                                                            LlamaForCausalLM)
    with seeded(seed):
        model = model_cls(config_cls(vocab_size=vocab, **TEXT))
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        for key, value in state.items():
            if "norm" in key:
                value.add_(torch.randn_like(value) * 0.1)
    return state


def official_config(text: str, projector: str, vocab: int, *, tower: str, image_size: int) -> dict:
    """config.json as LlavaLlamaForCausalLM / LlavaMistralForCausalLM save it (transformers 4.3x era)."""
    config = {
        "_name_or_path": "./checkpoints/base", "architectures": [
            "LlavaMistralForCausalLM" if text == "mistral" else "LlavaLlamaForCausalLM"],
        "model_type": "llava_mistral" if text == "mistral" else "llava",
        **TEXT, "pad_token_id": 0, "pretraining_tp": 1, "rope_scaling": None, "torch_dtype": "float32",
        "transformers_version": "4.31.0", "vocab_size": vocab,
        "freeze_mm_mlp_adapter": False, "image_aspect_ratio": "pad", "mm_hidden_size": VISION["hidden_size"],
        "mm_projector_type": projector, "mm_use_im_patch_token": False, "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2, "mm_vision_tower": tower,
        "tune_mm_mlp_adapter": False, "use_mm_proj": True, "tokenizer_model_max_length": 2048,
        "tokenizer_padding_side": "right",
    }
    if text == "mistral":
        config.update(rope_theta=1000000.0, sliding_window=None)
    else:
        config.update(rope_theta=10000.0)
    if projector == "cluster":
        config["num_latents"] = 256
    return config


def save_sharded(state: dict[str, torch.Tensor], path: Path, *, shards: int, fmt: str = "safetensors") -> None:
    """Weights split over ``shards`` files with the index ``save_pretrained`` (transformers 4.x) writes."""
    from safetensors.torch import save_file

    keys = list(state)
    per = math.ceil(len(keys) / shards)
    weight_map = {}
    suffix = "safetensors" if fmt == "safetensors" else "bin"
    stem = "model" if fmt == "safetensors" else "pytorch_model"
    for index in range(shards):
        name = f"{stem}-{index + 1:05d}-of-{shards:05d}.{suffix}"
        part = {k: state[k].contiguous() for k in keys[index * per:(index + 1) * per]}
        if fmt == "safetensors":
            save_file(part, str(path / name), metadata={"format": "pt"})
        else:
            torch.save(part, path / name)
        weight_map.update(dict.fromkeys(part, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index_name = "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
    (path / index_name).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))


def save_clip_dir(path: Path, image_size: int, vision_state: dict[str, torch.Tensor], *, full_clip: bool) -> Path:
    """A hub-style CLIP directory: ``openai/clip-vit-large-patch14-336`` is a full ``CLIPModel`` (text tower too);
    STLLaVA-Med's ViT part a ``CLIPVisionModel``. Weights under their hub names, preprocessing as CLIP's."""
    from safetensors.torch import save_file
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTextConfig

    path.mkdir(parents=True)
    if full_clip:
        text = CLIPTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              vocab_size=99, projection_dim=16, bos_token_id=1,
                              eos_token_id=2, pad_token_id=0)
        config = CLIPConfig(text_config=text.to_dict(), vision_config=vision_config(image_size).to_dict(),
                            projection_dim=16)
        with seeded(5):
            other = {k: v for k, v in CLIPModel(config).state_dict().items() if not k.startswith("vision_model.")}
        state = {**other, **vision_state}
        config.save_pretrained(path)
    else:
        state = dict(vision_state)
        vision_config(image_size).save_pretrained(path)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"),
              metadata={"format": "pt"})
    CLIPImageProcessor(size={"shortest_edge": image_size},
                       crop_size={"height": image_size, "width": image_size}).save_pretrained(path)
    return path


CASES = {
    # LLaVA-1.5 (Vicuna): CLIP tower not saved with it (a full CLIPModel dir on the command line), pad = unk
    "llava15": dict(text="llama", projector="mlp2x_gelu", image_size=56, embedded_vision=False, full_clip=True,
                    pad="<unk>", shards=3, fmt="safetensors"),
    # LLaVA-Med v1.5 (Mistral): .bin shards, no pad token (the conversion adds <pad>)
    "llava_med": dict(text="mistral", projector="mlp2x_gelu", image_size=56, embedded_vision=False,
                      full_clip=True, pad=None, shards=2, fmt="bin"),
    # STLLaVA-Med full model: cluster projector, vision tower saved with it; 576 image tokens as CLIP-L/336
    "stllava_full": dict(text="llama", projector="cluster", image_size=336, embedded_vision=True, full_clip=False,
                         pad="<unk>", shards=3, fmt="safetensors"),
    # STLLaVA-Med in released parts: LLM, ViT (CLIPVisionModel dir), projector (mm_projector.bin)
    "stllava_parts": dict(text="llama", projector="cluster", image_size=336, embedded_vision=False,
                          full_clip=False, pad="<unk>", shards=2, fmt="safetensors", split=True),
    # SQ-LLaVA's cluster projector on a Mistral text model, fewer image tokens (16) than centres (256)
    "sq_mistral": dict(text="mistral", projector="cluster", image_size=56, embedded_vision=False, full_clip=False,
                       pad=None, shards=2, fmt="safetensors"),
}


def build_original(root: Path, case: str) -> dict:
    """Write the original checkpoint of ``case``; returns the paths and the original tensors."""
    spec = CASES[case]
    tok = original_tokenizer(spec["pad"])
    vocab = len(tok)
    tower_name = "openai/clip-vit-large-patch14-336"
    vision = clip_vision_state(spec["image_size"], seed=1)
    projector = projector_state(spec["projector"], VISION["hidden_size"], TEXT["hidden_size"], seed=2)
    language = language_state(spec["text"], vocab, seed=3)
    llm = root / case
    llm.mkdir(parents=True)
    tok.save_pretrained(llm)
    config = official_config(spec["text"], spec["projector"], vocab, tower=tower_name, image_size=spec["image_size"])
    state = dict(language)
    # transformers 4.31's Llama kept rotary inv_freq in its state dict; old CLIP its position_ids
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.arange(8, dtype=torch.float32)
    paths = {"source": llm, "vision_tower": None, "projector": None}
    if spec.get("split"):
        paths["projector"] = root / f"{case}-projector"
        paths["projector"].mkdir()
        torch.save(projector, paths["projector"] / "mm_projector.bin")
        config["mm_vision_tower"] = str(root / f"{case}-vit")  # the release names its own ViT
    else:
        state.update(projector)
    if spec["embedded_vision"]:
        state.update({f"model.vision_tower.vision_tower.{k}": v for k, v in vision.items()})
        state["model.vision_tower.vision_tower.vision_model.embeddings.position_ids"] = torch.arange(
            (spec["image_size"] // PATCH) ** 2 + 1)[None]
        # the tower's config and preprocessing (a CLIP directory without weights: they are in the checkpoint)
        paths["vision_tower"] = root / f"{case}-vit-config"
        vision_config(spec["image_size"]).save_pretrained(paths["vision_tower"])
        from transformers import CLIPImageProcessor

        size = spec["image_size"]
        CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(
            paths["vision_tower"])
    else:
        paths["vision_tower"] = save_clip_dir(root / f"{case}-vit", spec["image_size"], vision,
                                              full_clip=spec["full_clip"])
    (llm / "config.json").write_text(json.dumps(config, indent=2))
    (llm / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "max_length": 4096}))
    save_sharded(state, llm, shards=spec["shards"], fmt=spec["fmt"])
    return {**paths, "vision": vision, "projector_state": projector, "language": language, "config": config,
            "tokenizer_dir": llm}


# --------------------------------------------------------------------------------------------------------------
# The original forward, from the original tensors
# --------------------------------------------------------------------------------------------------------------


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def clip_hidden_states(w: dict[str, torch.Tensor], pixel_values: torch.Tensor) -> list[torch.Tensor]:
    """CLIPVisionTransformer's ``hidden_states`` (embeddings after the pre-norm, then every layer's output)."""
    p = "vision_model."
    d, heads, eps = VISION["hidden_size"], VISION["num_attention_heads"], VISION["layer_norm_eps"]
    x = F.conv2d(pixel_values, w[p + "embeddings.patch_embedding.weight"], stride=PATCH).flatten(2).transpose(1, 2)
    cls = w[p + "embeddings.class_embedding"].expand(x.shape[0], 1, d)
    x = torch.cat([cls, x], dim=1) + w[p + "embeddings.position_embedding.weight"][None]
    x = F.layer_norm(x, (d,), w[p + "pre_layrnorm.weight"], w[p + "pre_layrnorm.bias"], eps)
    states = [x]
    for i in range(VISION["num_hidden_layers"]):
        q = f"{p}encoder.layers.{i}."

        def lin(name, t, q=q):
            return F.linear(t, w[q + name + ".weight"], w[q + name + ".bias"])

        h = F.layer_norm(x, (d,), w[q + "layer_norm1.weight"], w[q + "layer_norm1.bias"], eps)
        b, n, _ = h.shape
        split = [lin(f"self_attn.{k}_proj", h).view(b, n, heads, d // heads).transpose(1, 2) for k in "qkv"]
        attn = torch.softmax(split[0] @ split[1].transpose(-1, -2) / math.sqrt(d // heads), dim=-1) @ split[2]
        x = x + lin("self_attn.out_proj", attn.transpose(1, 2).reshape(b, n, d))
        h = F.layer_norm(x, (d,), w[q + "layer_norm2.weight"], w[q + "layer_norm2.bias"], eps)
        x = x + lin("mlp.fc2", quick_gelu(lin("mlp.fc1", h)))
        states.append(x)
    return states


def official_projector(kind: str, w: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``build_vision_projector``'s module, operation by operation as the official code writes it."""
    g = {k.removeprefix("model.mm_projector."): v for k, v in w.items()}

    def lin(name, t):
        return F.linear(t, g[name + ".weight"], g[name + ".bias"])

    if kind == "mlp2x_gelu":
        return lin("2", F.gelu(lin("0", x)))
    # Clustering.forward (x: [B, L, D])
    value = lin("v", x).permute(0, 2, 1)  # [B, D, L]
    feature = lin("f", x)  # [B, L, D]
    pool = torch.nn.AdaptiveAvgPool1d(256)
    centers = pool(x.permute(0, 2, 1))  # [B, D, N]
    centers_feature = pool(feature.permute(0, 2, 1)).permute(0, 2, 1)  # [B, N, D]
    centers = centers.permute(0, 2, 1)  # [B, N, D]
    for _ in range(2):
        centers = lin("c", centers)
        sim = torch.softmax(F.normalize(centers, dim=-1) @ F.normalize(value, dim=-1), dim=-2)  # [B, N, L]
        centers = sim @ feature
    cos = F.normalize(centers, dim=-1) @ F.normalize(x, dim=-1).transpose(-2, -1)
    similarity = torch.sigmoid(g["sim_beta"] + g["sim_alpha"] * cos)
    _, max_idx = similarity.max(dim=1, keepdim=True)
    mask = torch.zeros_like(similarity)
    mask.scatter_(1, max_idx, 1.0)
    similarity = similarity * mask
    out = ((feature.unsqueeze(dim=1) * similarity.unsqueeze(dim=-1)).sum(dim=2) + centers_feature) / (
        mask.sum(dim=-1, keepdim=True) + 1.0)
    out = x + (out.unsqueeze(dim=2) * similarity.unsqueeze(dim=-1)).sum(dim=1)
    return lin("mlp.2", quick_gelu(lin("mlp.0", out)))


def tokenizer_image_token(prompt: str, tokenizer) -> list[int]:
    """llava.mm_utils.tokenizer_image_token: chunks around ``<image>`` tokenised alone, IMAGE_TOKEN_INDEX (-200)
    between them, the first chunk's BOS kept once."""
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]
    ids: list[int] = []
    offset = 0
    if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        ids.append(chunks[0][0])
    for index, chunk in enumerate(chunks):
        if index:
            ids.append(-200)
        ids.extend(chunk[offset:])
    return ids


def original_logits(case: str, original: dict, prompt: str, pixel_values: torch.Tensor
                    ) -> tuple[torch.Tensor, list[int]]:
    """The logits of LlavaLlamaForCausalLM / LlavaMistralForCausalLM.forward(input_ids, images) in float64."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    spec = CASES[case]
    with warnings.catch_warnings():  # the directory's config.json is the official one (rope_scaling: null)
        warnings.simplefilter("ignore", FutureWarning)
        tok = AutoTokenizer.from_pretrained(original["tokenizer_dir"])
    ids = tokenizer_image_token(prompt, tok)
    vision = {k: v.double() for k, v in original["vision"].items()}
    selected = clip_hidden_states(vision, pixel_values.double())[-2][:, 1:]  # select layer -2, "patch"
    projector = {k: v.double() for k, v in original["projector_state"].items()}
    image_features = official_projector(spec["projector"], projector, selected)[0]
    config_cls, model_cls = (MistralConfig, MistralForCausalLM) if spec["text"] == "mistral" else (
        LlamaConfig, LlamaForCausalLM)
    extra = {"rope_theta": 1e6, "sliding_window": None} if spec["text"] == "mistral" else {"rope_theta": 1e4}
    lm = model_cls(config_cls(vocab_size=len(tok), **TEXT, **extra))
    lm.load_state_dict(original["language"], strict=True)
    lm = lm.double().eval()
    at = ids.index(-200)
    embed = lm.get_input_embeddings()
    with torch.no_grad():
        embeds = torch.cat([embed(torch.tensor(ids[:at])), image_features, embed(torch.tensor(ids[at + 1:]))])
        logits = lm(inputs_embeds=embeds[None]).logits[0]
    return logits, ids


def official_prompt(question: str, answer: str | None, system: str = SYSTEM_PROMPTS["llava_v1"]) -> str:
    """conv_llava_v1.get_prompt() (SeparatorStyle.TWO) for one exchange, image first."""
    text = f"{system} USER: <image>\n{question} ASSISTANT:"
    return text + (f" {answer}</s>" if answer is not None else "")


# --------------------------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------------------------

_CONVERTED: dict[str, tuple[dict, Path]] = {}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("convert_checkpoint")


def converted(case: str, root: Path) -> tuple[dict, Path]:
    if case not in _CONVERTED:
        original = build_original(root / "original", case)
        out = root / "hf" / case
        convert(original["source"], out, vision_tower=original["vision_tower"], projector=original["projector"],
                max_shard_size="40KB")
        _CONVERTED[case] = (original, out)
    return _CONVERTED[case]


def random_image(size: int) -> Image.Image:
    import numpy as np

    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


# --------------------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_converted_logits_equal_the_original_forward(case, root):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import stllava_med.backbone  # noqa: F401  (registers sq_llava)

    original, out = converted(case, root)
    spec = CASES[case]
    model, info = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float64, output_loading_info=True)
    assert not any(info.values()), info
    expected_class = "SQLlavaForConditionalGeneration" if spec["projector"] == "cluster" else \
        "LlavaForConditionalGeneration"
    assert type(model).__name__ == expected_class
    assert model.config.text_config.model_type == spec["text"]
    processor = AutoProcessor.from_pretrained(out)
    if spec["text"] == "llama":
        # the chat template renders the official conversation (conv_llava_v1) character for character
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]},
                    {"role": "assistant", "content": [{"type": "text", "text": ANSWER}]}]
        prompt = processor.apply_chat_template(messages, tokenize=False)
        assert prompt == official_prompt(QUESTION, ANSWER)
        assert processor.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True) == \
            official_prompt(QUESTION, None)
    else:  # LLaVA-Med v1.5's conv mistral_instruct, as the llava_mistral family renders it
        prompt = f"[INST] <image>\n{QUESTION} [/INST] {ANSWER}</s>"
    batch = processor(text=[prompt], images=[random_image(spec["image_size"])], return_tensors="pt")
    n_image = (spec["image_size"] // PATCH) ** 2
    assert int((batch["input_ids"] == model.config.image_token_index).sum()) == n_image
    with torch.no_grad():
        got = model(**batch).logits[0]
    expected, original_ids = original_logits(case, original, prompt, batch["pixel_values"])
    # the converted ids are the official tokenizer_image_token ids with -200 expanded to one id per image token
    at = original_ids.index(-200)
    flat = batch["input_ids"][0].tolist()
    assert flat[:at] + flat[at + n_image:] == original_ids[:at] + original_ids[at + 1:]
    vocab = expected.shape[-1]
    assert got.shape == (len(original_ids) - 1 + n_image, model.config.text_config.vocab_size)
    assert model.config.text_config.vocab_size % 64 == 0 and model.config.text_config.vocab_size > vocab
    difference = (got[:, :vocab] - expected).abs().max().item()
    print(f"{case}: max |logits - original| = {difference:.3e}")
    assert difference < ATOL
    # a non-trivial comparison: the image changes the logits after it
    with torch.no_grad():
        other = model(**processor(text=[prompt], images=[random_image(spec["image_size"]).rotate(90)],
                                  return_tensors="pt")).logits[0]
    assert (other[at + n_image:] - got[at + n_image:]).abs().max() > 1e-3


def test_conversion_layout_and_report(root):
    original, out = converted("stllava_full", root)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    names = set(index["weight_map"])
    assert {"model.multi_modal_projector.c.weight", "model.multi_modal_projector.sim_alpha",
            "model.multi_modal_projector.linear_1.weight", "model.multi_modal_projector.linear_2.bias"} <= names
    assert not any("ln_1" in n or "mm_projector" in n or "inv_freq" in n or "position_ids" in n for n in names)
    report = json.loads((out / "conversion.json").read_text())
    assert report["model_type"] == "sq_llava" and report["mm_projector_type"] == "cluster"
    assert report["family"] == "sq_llava" and report["image_tokens"] == 576
    assert report["added_tokens"] == ["<image>"]  # the tokenizer's pad is <unk>, as LLaVA's
    assert set(report["not_carried"]) == {
        "model.mm_projector.ln_1.weight", "model.mm_projector.ln_1.bias",
        "model.layers.0.self_attn.rotary_emb.inv_freq",
        "model.vision_tower.vision_tower.vision_model.embeddings.position_ids"}
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "sq_llava" and config["cluster_num_centers"] == 256
    assert config["cluster_iterations"] == 2 and config["projector_hidden_act"] == "quick_gelu"
    _, med = converted("llava_med", root)
    med_report = json.loads((med / "conversion.json").read_text())
    assert med_report["added_tokens"] == ["<image>", "<pad>"] and med_report["family"] == "llava_mistral"
    _, sq_mistral = converted("sq_mistral", root)
    assert json.loads((sq_mistral / "conversion.json").read_text())["family"] == "sq_llava_mistral"


def test_command_line_and_clear_errors(root, tmp_path, capsys):
    original = build_original(tmp_path / "cli", "llava15")
    with pytest.raises(SystemExit) as err:  # LLaVA-1.5 does not carry its vision tower
        main([str(original["source"]), "--out", str(tmp_path / "no_tower")])
    assert err.value.code == 2 and "--vision-tower" in capsys.readouterr().err
    assert main([str(original["source"]), "--vision-tower", str(original["vision_tower"]), "--out",
                 str(tmp_path / "hf"), "--dtype", "bfloat16", "--conv-mode", "v1_sq"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["model_type"] == "llava" and printed["projector_type"] == "mlp2x_gelu"
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    rendered = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q"}]},
         {"role": "assistant", "content": [{"type": "text", "text": "A"}]},
         {"role": "vuser", "content": [{"type": "text", "text": "Q2"}]},
         {"role": "assistant", "content": [{"type": "text", "text": "A2"}]}], tokenize=False)
    # conv_vicuna_v1_sq as SQ-LLaVA's preprocess renders a questioner turn: "VUSER: q</s> "
    assert rendered == SYSTEM_PROMPTS["v1_sq"] + " USER: <image>\nQ ASSISTANT: A</s>VUSER: Q2</s> ASSISTANT: A2</s>"
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["text_config"]["dtype"] == "bfloat16"
    with pytest.raises(ConversionError, match="not empty"):
        convert(original["source"], tmp_path / "hf", vision_tower=original["vision_tower"])
    # a config that contradicts the weights fails before anything is written
    bad = json.loads((original["source"] / "config.json").read_text())
    (original["source"] / "config.json").write_text(json.dumps({**bad, "mm_projector_type": "cluster"}))
    with pytest.raises(ConversionError, match="mlp2x_gelu"):
        convert(original["source"], tmp_path / "bad", vision_tower=original["vision_tower"])
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("case", ["stllava_full", "llava_med"])
def test_backbone_loader_generates_like_the_original(case, root):
    from stllava_med.backbone import load_backbone
    from stllava_med.chat import ChatFormat, prompt_text, vqa_turns
    from stllava_med.families import family_of
    from stllava_med.generation import generate_batch

    original, out = converted(case, root)
    backbone = load_backbone({"name_or_path": str(out), "name": case})
    family = family_of(backbone.model)
    assert family.name == {"stllava_full": "sq_llava", "llava_med": "llava_mistral"}[case]
    if case == "stllava_full":
        assert family.is_projector_parameter("model.multi_modal_projector.c.weight")
        assert family.is_projector_parameter("model.multi_modal_projector.sim_alpha")
    fmt = ChatFormat()
    prompt = prompt_text(backbone.processor, vqa_turns(QUESTION), "assistant", fmt)
    image = random_image(CASES[case]["image_size"])
    texts = generate_batch(backbone, [prompt], [image], max_new_tokens=4)
    assert len(texts) == 1
    # greedy: the first new token is the original model's argmax after the same prompt
    batch = backbone.processor(text=[prompt], images=[image], return_tensors="pt")
    expected, _ = original_logits(case, original, prompt, batch["pixel_values"])
    top = expected[-1].topk(2)
    assert float(top.values[0] - top.values[1]) > 1e-3  # no near-tie for float32 to flip
    first = int(top.indices[0])
    with torch.no_grad():
        output = backbone.model.generate(**batch, max_new_tokens=1, do_sample=False)
    assert int(output[0, -1]) == first


def test_sft_lora_steps_train_the_cluster_projector_at_its_rate(root):
    from stllava_med.backbone import load_backbone
    from stllava_med.chat import ChatFormat, Turn, encode
    from stllava_med.training import param_groups

    _, out = converted("stllava_parts", root)
    torch.manual_seed(0)
    backbone = load_backbone({"name_or_path": str(out), "name": "stllava",
                              "lora": {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}})
    model = backbone.model.train()
    turns = [Turn("user", QUESTION), Turn("assistant", ANSWER), Turn("questioner", "Is there a lesion?"),
             Turn("assistant", "Yes.")]
    encoded = encode(backbone.processor, turns, ChatFormat(), random_image(336))
    assert int((encoded.target_role == 2).sum()) > 0  # the questioner turn is a target
    inputs = {"input_ids": encoded.input_ids[None], "attention_mask": torch.ones_like(encoded.input_ids)[None],
              "pixel_values": encoded.pixel_values, "labels": encoded.labels[None]}
    groups = param_groups(model, lr=1e-3, projector_lr=5e-3)
    names = {id(p): n for n, p in model.named_parameters()}
    projector = [names[id(p)] for g in groups if g["name"].startswith("projector") for p in g["params"]]
    cluster = {"c.weight", "v.weight", "f.weight", "sim_alpha", "sim_beta", "linear_1.weight", "linear_2.weight"}
    assert all(any(n.endswith("multi_modal_projector.modules_to_save.default." + c) for n in projector)
               for c in cluster), projector
    assert all(g["lr"] == 5e-3 for g in groups if g["name"].startswith("projector"))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(groups)
    losses = []
    for _ in range(4):
        optimizer.zero_grad()
        loss = model(**inputs, use_cache=False).loss
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0], losses
    moved = {n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])}
    for part in ("c.weight", "v.weight", "f.weight", "sim_alpha", "linear_1.weight"):
        assert any(n.endswith("modules_to_save.default." + part) for n in moved), part
    assert any("lora_B" in n for n in moved)


def test_dpo_logps_fast_path_on_the_cluster_model(root, tmp_path):
    from stllava_med.backbone import load_backbone
    from stllava_med.chat import IGNORE_INDEX, ChatFormat, encode, vqa_turns
    from stllava_med.data.pairs.collate import PairCollator, PairItem
    from stllava_med.data.preference import PreferencePair
    from stllava_med.dpo.logps import LogProbs

    _, out = converted("stllava_full", root)
    backbone = load_backbone({"name_or_path": str(out), "name": "stllava"})
    model = backbone.model.eval()
    fmt = ChatFormat()
    pairs = [("Is there a fracture?", "Yes.", "No, the bones look normal and intact."),
             ("Where is the mass?", "Left upper lobe.", "There is no mass.")]
    items = []
    for index, (prompt, chosen, rejected) in enumerate(pairs):
        random_image(336).rotate(90 * index).save(tmp_path / f"image{index}.png")
        pair = PreferencePair(id=f"p{index}", images=[f"image{index}.png"], prompt=prompt, chosen=chosen,
                              rejected=rejected, source="test")
        items.append(PairItem(pair, tmp_path / "pairs.jsonl"))
    batch = PairCollator(backbone.processor, fmt)(items)
    with torch.no_grad():
        logps = LogProbs(model, prefix_sharing=True)
        assert logps.fast and logps.split_vision  # tower states shared, then the cluster projector
        result = logps(batch)
        for row, item in enumerate(items):
            image = Image.open(tmp_path / item.pair.images[0]).convert("RGB")
            for side, got in (("chosen", result.chosen), ("rejected", result.rejected)):
                enc = encode(backbone.processor, vqa_turns(item.pair.prompt, getattr(item.pair, side)), fmt, image)
                logits = model(input_ids=enc.input_ids[None], pixel_values=enc.pixel_values).logits[0, :-1]
                targets = enc.labels[1:]
                mask = targets != IGNORE_INDEX
                expected = torch.log_softmax(logits.float(), -1)[mask].gather(-1, targets[mask, None]).sum()
                torch.testing.assert_close(got[row].float(), expected, atol=1e-4, rtol=0)


def test_the_official_cluster_math_is_what_the_model_computes():
    """The HF projector alone against the official Clustering ops on random inputs with more tokens than
    centres and fewer (pooling up and down), in float64."""
    from transformers import CLIPVisionConfig, LlamaConfig

    from stllava_med.models.sq_llava import SQLlavaClusterProjector, SQLlavaConfig

    config = SQLlavaConfig(vision_config=CLIPVisionConfig(hidden_size=8, num_attention_heads=2),
                           text_config=LlamaConfig(hidden_size=12, num_attention_heads=2))
    with seeded(0):
        projector = SQLlavaClusterProjector(config).double()
        with torch.no_grad():
            projector.sim_alpha.fill_(2.0)
            projector.sim_beta.fill_(0.3)
    state = OrderedDict()
    for name, value in projector.state_dict().items():
        official = name.replace("linear_1.", "mlp.0.").replace("linear_2.", "mlp.2.")
        state[f"model.mm_projector.{official}"] = value
    for tokens in (576, 300, 100):
        x = torch.randn(2, tokens, 8, dtype=torch.float64)
        torch.testing.assert_close(projector(x), official_projector("cluster", state, x), atol=1e-12, rtol=0)
