"""Fixtures shared by several test files: tiny saved checkpoints (a base model to start LoRA from; a checkpoint and
its engine for the inference tests: chat, batch, server, Gradio)."""

from __future__ import annotations

import pytest
import torch

from videollm.data.sampling import SamplingSpec
from videollm.infer.session import InferenceEngine
from videollm.model.checkpoint import save_checkpoint
from videollm.model.presets import build_tiny_model_and_processor


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A tiny checkpoint to start LoRA from (LoRA needs pretrained frozen parts)."""
    torch.manual_seed(0)
    model, processor = build_tiny_model_and_processor("pool", sampling=SamplingSpec(num_frames=4))
    path = tmp_path_factory.mktemp("base")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny pool-projector checkpoint sampling 3 frames, not the default 8, so that frames sampled with another spec
    would show. It decodes in-process: no decode worker to start per engine (test_serve overrides this to keep one)."""
    torch.manual_seed(0)
    model, processor = build_tiny_model_and_processor("pool", sampling=SamplingSpec(num_frames=3))
    processor.decode_timeout = None
    path = tmp_path_factory.mktemp("ckpt")
    save_checkpoint(model, processor, path)
    return path


@pytest.fixture(scope="module")
def engine(checkpoint):
    return InferenceEngine.from_checkpoint(checkpoint)


@pytest.fixture
def encoded(engine, monkeypatch):
    """Frame indices of every video the model is given."""
    calls = []
    encode = engine.processor.encode

    def spy(messages, videos=(), **kwargs):
        calls.append([list(v.indices) for v in videos])
        return encode(messages, videos, **kwargs)

    monkeypatch.setattr(engine.processor, "encode", spy)
    return calls
