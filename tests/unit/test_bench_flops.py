"""``benchmarks/flops.py``: the FLOP counter behind the benchmarks' FLOP ratios counts matrix products and the CPU
attention kernel (torch's own counter skips it) exactly, forward and backward, grouped-query attention at the
query heads."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from flops import count_flops  # noqa: E402

aten = torch.ops.aten


def test_matrix_products_forward_and_backward():
    a = torch.randn(10, 20, requires_grad=True)
    b = torch.randn(20, 30)
    with count_flops() as counter:
        (a @ b).sum().backward()
    # forward 2*10*20*30; backward: the gradient of `a` only (b needs none), another 2*10*30*20
    assert counter.get_total_flops() == 2 * (2 * 10 * 20 * 30)


def test_cpu_attention_kernel_counted_with_grouped_query_heads():
    batch, heads, kv_heads, queries, keys, dim = 2, 4, 2, 10, 12, 8
    q = torch.randn(batch, heads, queries, dim, requires_grad=True)
    k = torch.randn(batch, kv_heads, keys, dim, requires_grad=True)
    v = torch.randn(batch, kv_heads, keys, dim, requires_grad=True)
    with count_flops() as counter:
        out = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    counts = counter.get_flop_counts()["Global"]
    forward = 2 * (2 * batch * heads * queries * keys * dim)  # q @ k^T and p @ v at the query heads
    assert counts[aten._scaled_dot_product_flash_attention_for_cpu] == forward
    with count_flops() as counter:
        out.sum().backward()
    # flash backward: q k^T recomputed, then dV, dP, dQ, dK: five products of the forward's size each
    assert counter.get_total_flops() == 5 * forward // 2


def test_a_masked_call_counts_the_same_as_a_dense_one():
    q, k, v = (torch.randn(1, 2, 6, 4) for _ in range(3))
    mask = torch.ones(1, 1, 6, 6, dtype=torch.bool).tril()
    with count_flops() as masked:
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    with count_flops() as dense:
        F.scaled_dot_product_attention(q, k, v)
    assert masked.get_total_flops() == dense.get_total_flops() > 0
