"""Padding-free batches: every sample of a batch in one row, positions restarting per sample.

transformers does the attention part: with `position_ids` that restart and no `attention_mask`, flash-attention 2/3
runs varlen over the samples, our `sdpa_packed` (`videollm.model.attention`, what SFT switches sdpa to when packing)
runs sdpa once per sample, and sdpa/eager get a block-diagonal causal mask (built only when no KV cache is made, which
the model's training forward ensures). `DataCollatorWithFlattening` lays out the tokens; what video adds is the
frames (or cached features) of every sample, concatenated in sample order, which is the order of the `<video>`
placeholders in the packed row.

The batch holds the same samples and label tokens as a padded one, so the number of steps is unchanged and, with the
loss summed over label tokens and divided by their count (`videollm.model.loss`), so are the loss and the gradients.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transformers import DataCollatorWithFlattening

from videollm.data.processor import IGNORE_INDEX, concat_video_tensors
from videollm.model.attention import PACKED_SDPA
from videollm.data.dataset import with_sample_ids


def dense_packing_warning(attn_implementation: str | None) -> str | None:
    """Why packing may cost more than it saves with this attention implementation (None when it attends per sample).

    For sdpa and eager, transformers turns the packed row into one dense block-diagonal mask over the whole row, so
    attention work grows with the square of the row (every sample of the batch) instead of the sum of the samples'
    squares; on the CPU benchmark (bench/RESULTS.md) that cost more than the padding saved.
    """
    if attn_implementation is not None and (attn_implementation.startswith("flash") or attn_implementation == PACKED_SDPA):
        return None
    return (
        f"packing: true with attn_implementation {attn_implementation or 'sdpa'}: samples are separated by a dense "
        "block-diagonal mask over the whole packed row, so attention costs grow with the square of the row; packing pays "
        f"off with {PACKED_SDPA} or flash_attention_2/3"
    )


class PackingCollator:
    """Collate processor features into one packed row: `input_ids`, `labels`, `position_ids` of shape (1, tokens).

    Args:
        return_flash_attn_kwargs: also return `cu_seq_lens_*` / `max_length_*`, which flash-attention would otherwise
            derive from `position_ids` (sdpa and eager ignore them).
        sample_ids: also list the samples' ids under `sample_ids` (see `VideoCollator`).
    """

    def __init__(self, return_flash_attn_kwargs: bool = False, sample_ids: bool = False):
        self.flatten = DataCollatorWithFlattening(
            return_position_ids=True, separator_id=IGNORE_INDEX, return_flash_attn_kwargs=return_flash_attn_kwargs
        )
        self.sample_ids = sample_ids

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        tokens = [{"input_ids": list(f["input_ids"]), "labels": list(f["labels"])} for f in features]
        batch = with_sample_ids(features, dict(self.flatten(tokens, return_tensors="pt")), self.sample_ids)
        return concat_video_tensors(features, batch)
