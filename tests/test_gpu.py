"""The GPU-only code paths: bf16 training, Liger's fused loss, packing with flash-attention's varlen kernel, the
inference front ends' default of the GPU in bf16.

CI has no GPU, so these skip there; `bench/gpu_checks.sh` runs them on a lent GPU machine. The CPU suite checks the
same behaviour in fp32 (tests/test_loss.py, tests/test_packing.py); these check that the CUDA kernels agree with it.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from test_hardware import train_two_steps_with_the_defaults
from test_packing import features, loss_and_grads, make_video
from torch import nn

from videollm.data.dataset import VideoCollator
from videollm.data.packing import PackingCollator
from videollm.data.sampling import SamplingSpec
from videollm.infer.generate import GenerationSettings
from videollm.infer.placement import PlacementArguments
from videollm.infer.session import InferenceEngine
from videollm.model.loss import causal_lm_loss
from videollm.model.presets import build_tiny_model_and_processor
from videollm.train.sft import VideoSFTConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = "cuda"


def tiny_on_cuda(dtype: torch.dtype, attn: str = "sdpa"):
    torch.manual_seed(0)
    model, processor = build_tiny_model_and_processor("pool", sampling=SamplingSpec(num_frames=4), attn_implementation=attn)
    return model.to(CUDA, dtype).train(), processor


def on_cuda(batch: dict, dtype: torch.dtype) -> dict:
    return {
        key: (value.to(CUDA, dtype) if value.is_floating_point() else value.to(CUDA)) if torch.is_tensor(value) else value
        for key, value in batch.items()
    }


def test_bf16_step_tracks_the_fp32_step():
    """The same weights and batch in bf16 and fp32 on the GPU: the loss within 2% and every gradient finite."""
    model, processor = tiny_on_cuda(torch.float32)
    batch = VideoCollator(processor)(features(processor))
    fp32_loss, _ = loss_and_grads(model, on_cuda(batch, torch.float32))
    model.to(torch.bfloat16)
    bf16_loss, bf16_grads = loss_and_grads(model, on_cuda(batch, torch.bfloat16))
    assert bf16_loss.dtype == torch.float32  # the loss head accumulates in fp32 whatever the weights
    assert abs(bf16_loss.item() - fp32_loss.item()) < 0.02 * fp32_loss.item()
    assert all(torch.isfinite(g).all() for g in bf16_grads)
    assert any(g.abs().sum() > 0 for g in bf16_grads)


def test_packed_equals_padded_on_cuda_sdpa():
    """fp32 on the GPU with sdpa's dense block-diagonal mask: the same loss and gradients as the padded batch."""
    model, processor = tiny_on_cuda(torch.float32)
    samples = features(processor)
    padded_loss, padded_grads = loss_and_grads(model, on_cuda(VideoCollator(processor)(samples), torch.float32))
    packed_loss, packed_grads = loss_and_grads(model, on_cuda(PackingCollator()(samples), torch.float32))
    assert abs(packed_loss.item() - padded_loss.item()) < 1e-5
    for packed, padded in zip(packed_grads, padded_grads, strict=True):
        assert torch.allclose(packed, padded, atol=1e-4, rtol=1e-3)


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="flash-attn (the gpu extra) is not installed")
def test_packed_equals_padded_with_flash_attention():
    """bf16 with flash_attention_2: packed rows use the varlen kernel; the loss matches the padded batch's within bf16
    noise, and both match sdpa's."""
    model, processor = tiny_on_cuda(torch.bfloat16, attn="flash_attention_2")
    samples = features(processor)
    padded_loss, _ = loss_and_grads(model, on_cuda(VideoCollator(processor)(samples), torch.bfloat16))
    packed_loss, _ = loss_and_grads(model, on_cuda(PackingCollator()(samples), torch.bfloat16))
    sdpa_model, _ = tiny_on_cuda(torch.bfloat16)
    sdpa_loss, _ = loss_and_grads(sdpa_model, on_cuda(VideoCollator(processor)(samples), torch.bfloat16))
    assert abs(packed_loss.item() - padded_loss.item()) < 1e-2 * padded_loss.item()
    assert abs(sdpa_loss.item() - padded_loss.item()) < 1e-2 * padded_loss.item()


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="liger-kernel (the gpu extra) is not installed")
def test_liger_loss_equals_the_chunked_loss():
    """Liger's fused kernel (the default on a GPU when installed) and the torch chunked path: same loss, same
    gradients for the hidden states and the head."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 40, 64, generator=generator).to(CUDA).requires_grad_()
    head = nn.Linear(64, 1000, bias=False).to(CUDA)
    labels = torch.randint(1000, (2, 40), generator=generator).to(CUDA)
    labels[0, :10] = -100
    results = []
    for use_liger in (True, False):
        loss = causal_lm_loss(hidden, head, labels, use_liger=use_liger)
        results.append((loss.detach(), *torch.autograd.grad(loss, [hidden, head.weight])))
    for liger, chunked in zip(*results, strict=True):
        assert torch.allclose(liger, chunked, atol=1e-4, rtol=1e-3)


def test_device_defaults_train_in_bf16_with_fp32_trainables(saved_model, tmp_path):
    """The defaults of `videollm.train.hardware` on this GPU: bf16 autocast on where the GPU supports it, frozen weights
    stored in bf16, LoRA and the projector in fp32; two Trainer steps change only the trainable weights."""
    assert VideoSFTConfig(output_dir=str(tmp_path), report_to="none").bf16 is torch.cuda.is_bf16_supported()
    train_two_steps_with_the_defaults(saved_model, tmp_path)


def test_inference_defaults_to_the_gpu_in_bf16(saved_model):
    """`--device auto --dtype auto` of the front ends on this GPU: the model on it in bf16, answers generated."""
    device, dtype = PlacementArguments().resolve()
    assert device.type == CUDA and dtype == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32)
    engine = InferenceEngine.from_checkpoint(saved_model, device, dtype)
    assert {(p.device.type, p.dtype) for p in engine.model.parameters()} == {(CUDA, dtype)}
    messages = [{"role": "user", "content": "<video>\nWhat moves?"}]
    answers = engine.generate([messages], [[make_video(4, 0)]], GenerationSettings(max_new_tokens=4))
    assert len(answers) == 1 and isinstance(answers[0][0], str)
