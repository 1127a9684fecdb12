"""The VoCo mask as variable-length attention: no mask materialised, no padding computed (docs/design.md §2.5).

A row's tokens split into *segments* that end where an image's VoCo span ends. Every query of a segment may
read the same earlier keys (the rule hides a closed image's vision keys from all of them alike, and official
mode hides the prefix from every text query alike) plus the segment's own tokens causally. So each segment
is one sequence of a varlen kernel whose keys are ``[earlier visible keys, the segment's tokens]`` and whose
queries are the segment's tokens: the kernel's bottom-right aligned causal mask (``seqlen_q <= seqlen_k``)
is then exactly the rule. The plan (which tokens go where, ``cu_seqlens``) is derived from
:class:`~llava_voco.model.voco_mask.VoCoLayout` once per forward and shared by every layer.

The kernels behind the varlen backends of the table in ``attention.py``: ``varlen_reference_attention`` (pure
torch with ``flash_attn_varlen_func``'s signature and semantics, so the plan, gather, scatter and backward run,
and are tested, on CPU), flash-attn's ``flash_attn_varlen_func`` and torch's own CUDA varlen kernel
(``torch.nn.attention.varlen``). ``varlen_attention_function(kernel)`` makes any such kernel an attention
function for transformers' ``AttentionInterface``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .voco_mask import NEVER_HIDDEN, VoCoLayout

PLAN_KWARG = "voco_varlen_plan"  # the forward keyword the plan travels in, to every layer


@dataclass
class VarlenPlan:
    """Which tokens each varlen sequence (segment) reads, for one forward; shared by all layers."""

    query_index: torch.Tensor  # [total_q] flat index into [batch * q_length]: each segment's queries, in order
    key_index: torch.Tensor  # [total_k] flat index into [batch * kv_length]: each segment's keys, in order
    cu_seqlens_q: torch.Tensor  # [segments + 1] int32
    cu_seqlens_k: torch.Tensor  # [segments + 1] int32
    max_seqlen_q: int
    max_seqlen_k: int
    batch_size: int
    q_length: int
    kv_length: int

    @property
    def num_segments(self) -> int:
        return len(self.cu_seqlens_q) - 1


def build_varlen_plan(
    layout: VoCoLayout | None,
    attention_mask: torch.Tensor | None,  # [batch, kv_length] 1 for real tokens, or None
    *,
    batch_size: int,
    q_offset: int,
    q_length: int,
    device: torch.device | str | None = None,
) -> VarlenPlan:
    """The segments of every row for queries ``q_offset .. q_offset + q_length`` over ``kv_length`` keys.

    Without a layout (VoCo off, or no VoCo token in the batch) each row is one causal sequence of its real
    tokens: padding-free plain attention.
    """
    kv_length = q_offset + q_length
    if layout is not None:
        device = layout.key_visible_until.device
    elif attention_mask is not None:
        device = attention_mask.device
    real = (attention_mask.bool() if attention_mask is not None
            else torch.ones(batch_size, kv_length, dtype=torch.bool, device=device))
    if real.shape[1] != kv_length:
        raise ValueError(f"attention_mask covers {real.shape[1]} keys, the forward has {kv_length}")
    positions = torch.arange(kv_length, device=device)
    query_parts, key_parts, q_lengths, k_lengths = [], [], [], []
    for row in range(batch_size):
        row_real = real[row]
        if layout is not None:
            visible_until = layout.key_visible_until[row]  # [kv_length]
            first_voco, text_start = layout.first_voco[row], layout.text_start[row]  # [kv_length], per sample
            samples = layout.sample_index[row] if layout.sample_index is not None else None
            ends = (visible_until[(visible_until < NEVER_HIDDEN) & row_real] + 1).unique().tolist()
            if layout.mode == "official":  # text reads no prefix: its own segment (after a cache no VoCo end marks it)
                ends += text_start[(text_start < NEVER_HIDDEN) & row_real].unique().tolist()
            if samples is not None:  # packed samples never share a segment
                ends += (torch.nonzero(samples[1:] != samples[:-1]).flatten() + 1).tolist()
        else:
            visible_until, samples, ends = None, None, []
        starts = [0, *sorted({end for end in ends if 0 < end < kv_length})]
        stops = [*starts[1:], kv_length]
        for start, stop in zip(starts, stops):
            if stop <= q_offset:
                continue  # a segment wholly in the cache asks nothing
            earlier = row_real[:start]
            if visible_until is not None:
                earlier = earlier & (visible_until[:start] >= start)
                if samples is not None:
                    earlier = earlier & (samples[:start] == samples[start])
                if layout.mode == "official" and start >= int(text_start[start]):
                    earlier = earlier & (positions[:start] >= first_voco[start])
            own = row_real[start:stop]
            own_keys = positions[start:stop][own]
            queries = own_keys[own_keys >= q_offset]
            if len(queries) == 0:
                continue
            keys = torch.cat([positions[:start][earlier], own_keys])
            query_parts.append(row * q_length + queries - q_offset)
            key_parts.append(row * kv_length + keys)
            q_lengths.append(len(queries))
            k_lengths.append(len(keys))

    def cumulative(lengths: list[int]) -> torch.Tensor:
        return torch.tensor([0, *lengths], dtype=torch.int64, device=device).cumsum(0).to(torch.int32)

    empty = torch.zeros(0, dtype=torch.long, device=device)
    return VarlenPlan(
        query_index=torch.cat(query_parts) if query_parts else empty,
        key_index=torch.cat(key_parts) if key_parts else empty,
        cu_seqlens_q=cumulative(q_lengths),
        cu_seqlens_k=cumulative(k_lengths),
        max_seqlen_q=max(q_lengths, default=0),
        max_seqlen_k=max(k_lengths, default=0),
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
    )


def varlen_reference_attention(
    q: torch.Tensor,  # [total_q, heads, head_dim]
    k: torch.Tensor,  # [total_k, kv_heads, head_dim]
    v: torch.Tensor,  # [total_k, kv_heads, head_dim]
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """``flash_attn_varlen_func`` in plain torch: same arguments, same semantics (causal aligned to the
    bottom right when ``seqlen_q < seqlen_k``, GQA by repeating each key/value head), one sequence at a time.
    Returns ``[total_q, heads, head_dim]``."""
    heads, kv_heads = q.shape[1], k.shape[1]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads cannot share {kv_heads} key/value heads")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    outputs = []
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for (q_start, q_end), (k_start, k_end) in zip(zip(bounds_q, bounds_q[1:]), zip(bounds_k, bounds_k[1:])):
        queries = q[q_start:q_end].transpose(0, 1)  # [heads, Lq, D]
        keys = k[k_start:k_end].transpose(0, 1).repeat_interleave(heads // kv_heads, dim=0)  # [heads, Lk, D]
        values = v[k_start:k_end].transpose(0, 1).repeat_interleave(heads // kv_heads, dim=0)
        scores = (queries.float() @ keys.float().transpose(1, 2)) * scale  # [heads, Lq, Lk]
        if causal:
            length_q, length_k = q_end - q_start, k_end - k_start
            rows = torch.arange(length_q, device=q.device)[:, None]
            columns = torch.arange(length_k, device=q.device)[None, :]
            scores = scores.masked_fill(columns > rows + (length_k - length_q), float("-inf"))
        probabilities = scores.softmax(dim=-1)
        if dropout_p > 0:
            probabilities = F.dropout(probabilities, p=dropout_p)
        outputs.append((probabilities @ values.float()).to(q.dtype).transpose(0, 1))  # [Lq, heads, D]
    if not outputs:
        return q.new_zeros(q.shape)
    return torch.cat(outputs)


def flash_attn_varlen(*args, **kwargs):
    """flash-attn's ``flash_attn_varlen_func``, imported when first run (the package is CUDA only)."""
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func(*args, **kwargs)


def torch_varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False):
    """torch's own CUDA varlen kernel (``torch.nn.attention.varlen.varlen_attn``) behind flash-attn's signature."""
    from torch.nn.attention.varlen import varlen_attn

    if dropout_p:
        raise ValueError("varlen_torch has no attention dropout; use flash_attention_2 or varlen_reference")
    return varlen_attn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale=softmax_scale,
                       window_size=(-1, 0) if causal else (-1, -1), enable_gqa=q.shape[1] != k.shape[1])


def varlen_attention_function(kernel):
    """An attention function for transformers' ``AttentionInterface`` running ``kernel`` (``flash_attn_varlen_func``'s
    signature) through the plan in ``voco_varlen_plan``: ``query`` ``[B, H, S, D]``, ``key`` / ``value``
    ``[B, H_kv, KV, D]``; returns ``([B, S, H, D], None)``. Without a plan (a model that does not build it) each
    row is one causal sequence of its real tokens, and a non-causal module (a vision tower) runs sdpa."""

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        plan: VarlenPlan | None = kwargs.get(PLAN_KWARG)
        batch_size, heads, q_length, head_dim = query.shape
        kv_length = key.shape[2]
        if plan is None:
            if not getattr(module, "is_causal", True):
                return sdpa_attention_forward(module, query, key, value, None, scaling=scaling, dropout=dropout)
            padding = attention_mask if attention_mask is not None and attention_mask.ndim == 2 else None
            plan = build_varlen_plan(None, padding, batch_size=batch_size, q_offset=kv_length - q_length,
                                     q_length=q_length, device=query.device)
        if (plan.batch_size, plan.q_length, plan.kv_length) != (batch_size, q_length, kv_length):
            raise ValueError(
                f"the varlen plan was made for batch {plan.batch_size}, {plan.q_length} queries over "
                f"{plan.kv_length} keys; this layer has {batch_size}, {q_length}, {kv_length}"
            )
        flat_q = query.transpose(1, 2).reshape(batch_size * q_length, heads, head_dim)[plan.query_index]
        flat_k = key.transpose(1, 2).reshape(batch_size * kv_length, key.shape[1], head_dim)[plan.key_index]
        flat_v = value.transpose(1, 2).reshape(batch_size * kv_length, value.shape[1], value.shape[-1])[plan.key_index]
        out = kernel(
            flat_q, flat_k, flat_v, plan.cu_seqlens_q, plan.cu_seqlens_k, plan.max_seqlen_q, plan.max_seqlen_k,
            dropout_p=dropout if module.training else 0.0, softmax_scale=scaling, causal=True,
        )  # [total_q, H, D]
        # padding queries read nothing: zeros, as flash-attn's padding-free path leaves them
        output = out.new_zeros(batch_size * q_length, heads, out.shape[-1]).index_copy(0, plan.query_index, out)
        return output.view(batch_size, q_length, heads, out.shape[-1]), None

    return attention


__all__ = [
    "PLAN_KWARG",
    "VarlenPlan",
    "build_varlen_plan",
    "flash_attn_varlen",
    "torch_varlen_attention",
    "varlen_attention_function",
    "varlen_reference_attention",
]
