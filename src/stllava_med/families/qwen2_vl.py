"""Qwen2-VL and Qwen2.5-VL: dynamic resolution, patch merger inside ``visual``, 3-D (mrope) positions.

Per example the processor returns the image's flattened patches ``(n_patches, dim)`` and ``image_grid_thw``
``(1, 3)``: both concatenate along dim 0 in a batch; ``mm_token_type_ids`` is per token. The published
template renders any role as ``<|im_start|>role``, so the questioner is ``<|im_start|>vuser``; every turn
ends with ``<|im_end|>``. Positions are 3-D and come from the model's rope index, which the fast paths use.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from stllava_med.families.base import Family


class QwenVLFamily(Family):
    def position_ids(self, model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     extras: Mapping[str, torch.Tensor]) -> torch.Tensor:
        core = model.model
        kwargs: dict[str, Any] = {"image_grid_thw": extras.get("image_grid_thw"), "attention_mask": attention_mask}
        if "mm_token_type_ids" in extras:
            kwargs["mm_token_type_ids"] = extras["mm_token_type_ids"]
        positions, _ = core.get_rope_index(input_ids, **kwargs)
        return positions


_FIELDS = dict(
    vision_pattern=r"(^|\.)visual\.",
    projector_pattern=r"(^|\.)visual\.merger\.",
    lora_targets=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
    vision_lora_targets=r".*visual\.blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.gate_proj|mlp\.up_proj|mlp\.down_proj|mlp\.fc1|mlp\.fc2)",
    projector_modules=("merger",),
    batch_keys={"pixel_values": "concat", "image_grid_thw": "concat", "mm_token_type_ids": "token"},
    end_of_turn="<|im_end|>",
    prefix_sharing=True,
    shared_prefix_sampling=True,
    rope_index=True,
)

QWEN2_5_VL = QwenVLFamily(name="qwen2_5_vl", description="Qwen2.5-VL (Qwen2_5_VLForConditionalGeneration)",
                          model_types=("qwen2_5_vl",), **_FIELDS)
QWEN2_VL = QwenVLFamily(name="qwen2_vl", description="Qwen2-VL (Qwen2VLForConditionalGeneration)",
                        model_types=("qwen2_vl",), **_FIELDS)
