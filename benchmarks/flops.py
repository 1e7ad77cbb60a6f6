"""Counting the arithmetic a training run does: matrix products and attention, forward and backward.

``count_flops()`` is ``torch.utils.flop_counter.FlopCounterMode`` (mm, addmm, bmm, convolutions, the CUDA
attention kernels) plus the CPU attention kernel (``_scaled_dot_product_flash_attention_for_cpu`` and its
backward), which torch does not count, with grouped-query attention (fewer key/value heads than query heads)
counted at the query heads. Attention is counted dense (every query against every key, as the kernels' FLOP
formulas do), the same way for every contender, so the counts compare work, not kernels' skipping of masked
blocks. Elementwise work (norms, activations, softmax) is not counted: it is a small share of a transformer's
arithmetic, though not of its memory traffic.

The benchmarks use it to show the ceiling of a speed-up: when two programs run their products at the same speed,
the ratio of their times cannot exceed the ratio of their counted FLOPs by much.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils import flop_counter

aten = torch.ops.aten


def _with_query_heads(query_shape: Any, other_shape: Any) -> tuple[int, ...]:
    b, h, _, _ = query_shape
    _, _, s, d = other_shape
    return (b, h, s, d)


def _cpu_sdpa(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, out_shape: Any = None,
              **kwargs: Any) -> int:
    return flop_counter.sdpa_flop_count(query_shape, _with_query_heads(query_shape, key_shape),
                                        _with_query_heads(query_shape, value_shape))


def _cpu_sdpa_backward(grad_out_shape: Any, query_shape: Any, key_shape: Any, value_shape: Any, *args: Any,
                       out_shape: Any = None, **kwargs: Any) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape,
                                                 _with_query_heads(query_shape, key_shape),
                                                 _with_query_heads(query_shape, value_shape))


def count_flops() -> flop_counter.FlopCounterMode:
    """A context manager counting FLOPs in this thread (``.get_total_flops()`` after it)."""
    mapping = {aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa,
               aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward}
    return flop_counter.FlopCounterMode(display=False, custom_mapping=mapping)
