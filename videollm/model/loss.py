"""The causal-LM loss computed from hidden states, without full-vocabulary logits for the whole sequence.

A video sample is mostly visual tokens and prompt, and only its answer is scored: with Qwen2.5's 152k vocabulary, the
fp32 logits of a 4k-token sample take 2.5 GB, of which a few dozen rows are used. So the LM head runs only at the
positions that have a label, and the cross-entropy runs over chunks of those rows, each chunk's logits freed before the
next (the gradients are computed chunk by chunk in the forward pass, the way Liger's fused linear cross-entropy does).
On a GPU with liger-kernel installed, Liger's fused Triton kernel does the same work.

The normalisation matches transformers' `ForCausalLMLoss`: the sum over label tokens divided by `num_items_in_batch`
when the Trainer passes it (label tokens of all gradient-accumulation micro-batches), else their mean, so padded and
packed batches, and any split into micro-batches, give the same loss.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

IGNORE_INDEX = -100
# Rows of logits per chunk: about 256 MB of fp32 logits (with their gradient) at a 152k vocabulary.
CHUNK_ELEMENTS = 1 << 26


def liger_available() -> bool:
    """Whether liger-kernel is installed (an optional GPU extra; its kernels do not run on a CPU)."""
    return importlib.util.find_spec("liger_kernel") is not None


def shift_targets(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The label each position predicts: `labels[..., 1:]`, with `ignore_index` after the last token."""
    return F.pad(labels[..., 1:], (0, 1), value=ignore_index)


def causal_lm_loss(
    hidden_states: torch.Tensor,
    lm_head: nn.Module,
    labels: torch.Tensor | None = None,
    shift_labels: torch.Tensor | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int | None = None,
    use_liger: bool | None = None,
) -> torch.Tensor:
    """Next-token cross-entropy of `lm_head(hidden_states)` against `labels`, computing logits at label positions only.

    Args:
        hidden_states: `(batch, seq, hidden)` outputs of the last decoder layer.
        lm_head: the output projection (an `nn.Linear`; any other module is applied to the selected rows as is).
        labels: `(batch, seq)` token ids, `ignore_index` where nothing is scored; shifted here.
        shift_labels: already shifted targets (what padding-free collators may provide) instead of `labels`.
        num_items_in_batch: divide the summed loss by this (the Trainer's count over gradient accumulation);
            default: the number of label tokens here.
        chunk_size: rows of logits computed at once by the torch path (default: about `CHUNK_ELEMENTS` logits).
        use_liger: use Liger's fused kernel (default: when installed and the hidden states are on a GPU).
    """
    if shift_labels is None:
        if labels is None:
            raise ValueError("causal_lm_loss needs labels or shift_labels")
        shift_labels = shift_targets(labels, ignore_index)
    targets = shift_labels.to(hidden_states.device).reshape(-1)
    scored = (targets != ignore_index).nonzero().squeeze(-1)
    rows = hidden_states.reshape(-1, hidden_states.shape[-1]).index_select(0, scored)
    targets = targets.index_select(0, scored)
    total = _summed_cross_entropy(rows, lm_head, targets, chunk_size, use_liger)
    denominator = num_items_in_batch if num_items_in_batch is not None else int(scored.numel())
    # A step without a single label token has a zero loss and zero gradients, not 0 / 0 = NaN (which the non-finite
    # guard would skip and count as a bad step).
    if torch.is_tensor(denominator):
        denominator = denominator.to(total.device).clamp(min=1)
    else:
        denominator = max(denominator, 1)
    return total / denominator


def _summed_cross_entropy(
    rows: torch.Tensor, lm_head: nn.Module, targets: torch.Tensor, chunk_size: int | None, use_liger: bool | None
) -> torch.Tensor:
    if not _has_plain_weight(lm_head):
        # A sharded (ZeRO-3, FSDP) or wrapped head only has its full weight inside its own forward: call it, on the
        # label rows only.
        return F.cross_entropy(lm_head(rows).float(), targets, reduction="sum")
    if use_liger is None:
        use_liger = rows.is_cuda and liger_available()
    if use_liger:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        return liger_fused_linear_cross_entropy(
            input=rows, weight=lm_head.weight, target=targets, bias=lm_head.bias, reduction="sum"
        ).float()
    if chunk_size is None:
        chunk_size = max(1, CHUNK_ELEMENTS // lm_head.weight.shape[0])
    return chunked_linear_cross_entropy(rows, lm_head.weight, targets, lm_head.bias, chunk_size)


def _has_plain_weight(module: nn.Module) -> bool:
    """An `nn.Linear` whose `weight` is the whole local matrix (not a ZeRO-3 partition or an FSDP DTensor shard)."""
    if type(module) is not nn.Linear:
        return False
    return not hasattr(module.weight, "ds_id") and not isinstance(module.weight, DTensor)


def chunked_linear_cross_entropy(
    rows: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Summed cross-entropy of `rows @ weight.T (+ bias)` against `targets`, holding one chunk of logits at a time.

    The matmul runs in the inputs' dtype and the softmax in at least fp32, as transformers' loss does on upcast logits.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (rows, weight, bias))
    if not needs_grad:
        total = torch.zeros((), dtype=_accumulation_dtype(rows), device=rows.device)
        with torch.no_grad():
            for start in range(0, rows.shape[0], chunk_size):
                total += _chunk_loss(rows[start : start + chunk_size], weight, bias, targets[start : start + chunk_size])[0]
        return total
    return _ChunkedLinearCrossEntropy.apply(rows, weight, bias, targets, chunk_size)


def _chunk_loss(
    rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(summed loss, logits in at least fp32, log-sum-exp) of one chunk."""
    logits = F.linear(rows, weight, bias)
    logits = logits.to(_accumulation_dtype(logits))
    lse = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(1, targets.unsqueeze(1)).squeeze(1)
    return (lse - picked).sum(), logits, lse


def _accumulation_dtype(tensor: torch.Tensor) -> torch.dtype:
    """fp32 for half-precision tensors, their own dtype otherwise (fp64 stays fp64: tests compare exactly)."""
    return torch.promote_types(tensor.dtype, torch.float32)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Forward computes the loss and, chunk by chunk, its gradients; backward only scales them.

    Storing the gradients (the size of `rows` and of `weight`) instead of the logits is what keeps the memory at one
    chunk of logits; the FLOPs are those of the plain forward + backward.
    """

    @staticmethod
    def forward(ctx, rows, weight, bias, targets, chunk_size):
        grad_rows = torch.zeros_like(rows) if rows.requires_grad else None
        accumulate = _accumulation_dtype(weight)
        grad_weight = torch.zeros(weight.shape, dtype=accumulate, device=weight.device) if weight.requires_grad else None
        grad_bias = None
        if bias is not None and bias.requires_grad:
            grad_bias = torch.zeros(bias.shape, dtype=accumulate, device=bias.device)
        total = torch.zeros((), dtype=_accumulation_dtype(rows), device=rows.device)
        for start in range(0, rows.shape[0], chunk_size):
            chunk, chunk_targets = rows[start : start + chunk_size], targets[start : start + chunk_size]
            loss, logits, lse = _chunk_loss(chunk, weight, bias, chunk_targets)
            total += loss
            # d(sum of losses)/d(logits) = softmax - one_hot(target)
            grad_logits = torch.exp(logits.sub_(lse.unsqueeze(1)))
            grad_logits[torch.arange(chunk.shape[0], device=chunk.device), chunk_targets] -= 1.0
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0)
            grad_logits = grad_logits.to(rows.dtype)
            if grad_rows is not None:
                grad_rows[start : start + chunk_size] = grad_logits @ weight
            if grad_weight is not None:
                grad_weight += (grad_logits.T @ chunk).to(accumulate)
        ctx.save_for_backward(grad_rows, grad_weight, grad_bias)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_rows, grad_weight, grad_bias = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.dtypes
        return (
            None if grad_rows is None else grad_rows * grad_output.to(grad_rows.dtype),
            None if grad_weight is None else (grad_weight * grad_output).to(weight_dtype),
            None if grad_bias is None else (grad_bias * grad_output).to(bias_dtype),
            None,
            None,
        )
