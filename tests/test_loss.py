"""The loss head (videollm/model/loss.py): equal to full-logits cross-entropy, without computing full logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.loss.loss_utils import ForCausalLMLoss

import videollm.model.loss as loss_module
from videollm.data.sampling import SamplingSpec
from videollm.data.video import DecodedVideo
from videollm.model.loss import causal_lm_loss
from videollm.model.presets import build_tiny_model_and_processor

VOCAB, HIDDEN = 50, 16


def reference_loss(hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor, num_items=None) -> torch.Tensor:
    """The plain way: fp32 logits for every position, then transformers' causal-LM loss."""
    return ForCausalLMLoss(head(hidden), labels, vocab_size=head.out_features, num_items_in_batch=num_items)


def random_case(bias: bool, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 9, HIDDEN, generator=generator, dtype=torch.float64).float().requires_grad_()
    head = nn.Linear(HIDDEN, VOCAB, bias=bias)
    with torch.no_grad():
        head.weight.copy_(torch.randn(VOCAB, HIDDEN, generator=generator))
        if bias:
            head.bias.copy_(torch.randn(VOCAB, generator=generator))
    labels = torch.randint(VOCAB, (3, 9), generator=generator)
    labels[0, :4] = -100  # a prompt
    labels[2, 6:] = -100  # padding
    return hidden, head, labels


def grads(loss: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Gradients of `loss`; zeros for a tensor the loss does not depend on (e.g. the frame embeddings of unused frames)."""
    found = torch.autograd.grad(loss, tensors, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(tensors, found, strict=True)]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 4, 1000])
@pytest.mark.parametrize("num_items", [None, 37])
def test_loss_and_gradients_equal_full_logits(bias, chunk_size, num_items):
    hidden, head, labels = random_case(bias)
    params = [hidden, *head.parameters()]
    expected = reference_loss(hidden, head, labels, num_items)
    loss = causal_lm_loss(hidden, head, labels, num_items_in_batch=num_items, chunk_size=chunk_size, use_liger=False)
    assert torch.allclose(loss, expected, atol=1e-6, rtol=0)
    for ours, plain in zip(grads(loss, params), grads(expected, params), strict=True):
        assert torch.allclose(ours, plain, atol=1e-6, rtol=0)


def test_frozen_head_and_no_grad():
    """LoRA freezes the head: no weight gradient is computed; under no_grad the loss is the same number."""
    hidden, head, labels = random_case(bias=False, seed=1)
    head.requires_grad_(False)
    loss = causal_lm_loss(hidden, head, labels, chunk_size=5)
    (grad_hidden,) = grads(loss, [hidden])
    assert torch.allclose(grad_hidden, grads(reference_loss(hidden, head, labels), [hidden])[0], atol=1e-6, rtol=0)
    with torch.no_grad():
        assert torch.allclose(causal_lm_loss(hidden, head, labels, chunk_size=5), loss, atol=1e-6, rtol=0)


def test_shift_labels_and_no_label_tokens():
    hidden, head, labels = random_case(bias=False, seed=2)
    shifted = F.pad(labels[:, 1:], (0, 1), value=-100)
    assert torch.equal(causal_lm_loss(hidden, head, shift_labels=shifted), causal_lm_loss(hidden, head, labels))
    empty = causal_lm_loss(hidden, head, torch.full_like(labels, -100))
    assert empty.item() == 0.0
    empty.backward()  # still part of the graph (every rank of a distributed step must run backward)


@pytest.mark.parametrize("num_items", [0, torch.tensor(0)])
def test_a_step_without_label_tokens_has_zero_loss_and_gradients(num_items):
    """The Trainer's count over the whole step is 0 when no micro-batch has a label token: 0, not 0 / 0 = NaN."""
    hidden, head, labels = random_case(bias=True, seed=4)
    loss = causal_lm_loss(hidden, head, torch.full_like(labels, -100), num_items_in_batch=num_items, chunk_size=4)
    assert loss.item() == 0.0
    for grad in grads(loss, [hidden, *head.parameters()]):
        assert not grad.any()


def test_only_label_rows_reach_the_head(monkeypatch):
    """Logits are computed for the scored positions only: 27 positions, labels at 2..6 of one row -> 5 rows."""
    hidden, head, labels = random_case(bias=False, seed=3)
    labels.fill_(-100)
    labels[1, 2:7] = 3
    seen = []
    chunked = loss_module.chunked_linear_cross_entropy

    def spy(rows, weight, targets, bias=None, chunk_size=1024):
        seen.append(rows.shape[0])
        return chunked(rows, weight, targets, bias, chunk_size)

    monkeypatch.setattr(loss_module, "chunked_linear_cross_entropy", spy)
    causal_lm_loss(hidden, head, labels)
    assert seen == [5]


def make_video(num_frames: int, seed: int) -> DecodedVideo:
    frames = torch.randint(0, 256, (num_frames, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    return DecodedVideo(frames, list(range(num_frames)), [i / 8 for i in range(num_frames)], num_frames / 8, f"v{seed}")


def mixed_batch(processor) -> dict:
    """A 4-frame video, an 8-frame video and a text-only sample."""
    samples = [
        (("What color?", "red"), [make_video(4, 1)]),
        (("Which way does it move?", "left then right"), [make_video(8, 2)]),
        (("Say hi.", "hi"), []),
    ]
    features = []
    for (question, answer), videos in samples:
        prefix = "<video>\n" if videos else ""
        messages = [{"role": "user", "content": prefix + question}, {"role": "assistant", "content": answer}]
        features.append(processor.encode(messages, videos).as_features())
    return processor.collate(features)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_model_training_loss_and_gradients_equal_full_logits(dtype):
    """The model's training forward (no logits) gives the loss and gradients of full logits + plain cross-entropy.

    In fp64 both sides are exact to 1e-6 by a wide margin; in fp32 the loss (about 6.7) is compared relative to 1e-6,
    since one fp32 rounding step at that size is already 5e-7.
    """
    torch.manual_seed(0)
    model, processor = build_tiny_model_and_processor("pool", sampling=SamplingSpec(num_frames=4))
    model.to(dtype)
    batch = mixed_batch(processor)
    batch["pixel_values_videos"] = batch["pixel_values_videos"].to(dtype)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]

    out = model(**batch)
    assert out.logits is None
    ours = grads(out.loss, params)

    unlabelled = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**unlabelled, use_cache=False).logits
    targets = F.pad(batch["labels"][:, 1:], (0, 1), value=-100)
    expected = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    assert torch.allclose(out.loss, expected, atol=0, rtol=1e-6)
    for mine, plain in zip(ours, grads(expected, params), strict=True):
        assert torch.allclose(mine, plain, atol=1e-6, rtol=0)

    model.eval()
    with torch.no_grad():
        evaluated = model(**batch)
    assert evaluated.logits is not None and evaluated.loss.item() == pytest.approx(expected.item(), rel=1e-6)
