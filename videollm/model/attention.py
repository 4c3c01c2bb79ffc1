"""`sdpa_packed`: sdpa that attends within each sample of a packed row, for machines without a varlen kernel.

Why our own: for a packed row (positions restarting per sample, see `videollm.data.packing`) transformers gives sdpa
one dense block-diagonal mask over the whole row, so attention costs the square of the row instead of the sum of the
samples' squares; flash-attention's varlen kernel avoids that but needs a GPU and the flash-attn package. This
attention runs sdpa once per sample (causal, no mask) on packed rows and is plain sdpa everywhere else (padded
batches, generation with a KV cache). It is registered with transformers' attention and mask interfaces, the
library's extension point for attention functions, under `PACKED_SDPA`; the mask transformers builds is sdpa's.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

PACKED_SDPA = "sdpa_packed"
# The keyword the model's forward passes down to every attention call: the packed row's sample bounds, found once per
# forward (one host copy) instead of once per layer.
PACKED_BOUNDS = "packed_sample_bounds"


def sample_bounds(position_ids: torch.Tensor | None) -> list[int] | None:
    """Where the samples of a packed row start, then its length (`[0, start_2, ..., length]`), or None when
    `position_ids` is not one packed row: every position that is not the previous one plus one starts a sample."""
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[0] != 1:
        return None
    positions = position_ids[0]
    starts = (torch.nonzero(positions[1:] != positions[:-1] + 1).flatten() + 1).tolist()
    return [0, *starts, positions.shape[0]] if starts else None


def packed_segments(
    position_ids: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor, bounds: list[int] | None = None
) -> list[tuple[int, int]] | None:
    """The `(start, end)` token ranges of the samples in a packed row, or None when this is not one.

    A packed row is a batch of one row, without a KV cache (as many keys as queries), whose positions restart.
    `bounds` are the row's `sample_bounds` when the caller found them already (empty: not a packed row).
    """
    length = query.shape[2]
    if query.shape[0] != 1 or key.shape[2] != length:
        return None
    if bounds is None:
        bounds = sample_bounds(position_ids)
    if not bounds or bounds[-1] != length:
        return None
    return list(zip(bounds[:-1], bounds[1:]))


def packed_sdpa_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: `(batch, heads, tokens, head_dim)` in, `(batch, tokens, heads,
    head_dim)` out. On a packed row the block-diagonal `attention_mask` is not used: each sample attends causally to
    itself, which is what that mask says."""
    segments = packed_segments(kwargs.get("position_ids"), query, key, kwargs.pop(PACKED_BOUNDS, None))
    if segments is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    outputs = [
        sdpa_attention_forward(
            module,
            query[:, :, start:end],
            key[:, :, start:end],
            value[:, :, start:end],
            None,
            dropout=dropout,
            scaling=scaling,
            is_causal=True,
            **kwargs,
        )[0]
        for start, end in segments
    ]
    return torch.cat(outputs, dim=1), None


AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)
