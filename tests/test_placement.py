"""Where the inference front ends (chat, batch generation, server, demo, evaluator) run a checkpoint: `--device` and
`--dtype`, their defaults on a CPU and on a GPU, and one clear line for a device the machine does not have."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from test_packing import make_video

from videollm.data.dataset import VideoCollator
from videollm.eval.__main__ import main as eval_main
from videollm.infer.batch import main as batch_main
from videollm.infer.chat import main as chat_main
from videollm.infer.demo import main as demo_main
from videollm.infer.generate import GenerationSettings
from videollm.infer.placement import PlacementArguments
from videollm.infer.serve import main as serve_main
from videollm.infer.session import InferenceEngine
from videollm.train.hardware import Hardware


def on_a_machine(monkeypatch, gpus: int, bf16: bool = True) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    hardware = Hardware(cuda=gpus > 0, bf16=gpus > 0 and bf16, flash_attn=False)
    monkeypatch.setattr(Hardware, "detect", staticmethod(lambda use_cpu=False: hardware))


@pytest.mark.parametrize(
    ("gpus", "bf16", "device", "dtype", "expected"),
    [
        (0, False, "auto", "auto", ("cpu", torch.float32)),
        (1, True, "auto", "auto", ("cuda", torch.bfloat16)),
        (1, False, "auto", "auto", ("cuda", torch.float32)),  # a V100: no bf16
        (1, True, "cpu", "auto", ("cpu", torch.float32)),
        (1, True, "cuda:0", "float16", ("cuda:0", torch.float16)),
        (0, False, "cpu", "bfloat16", ("cpu", torch.bfloat16)),
    ],
)
def test_placement_defaults(monkeypatch, gpus, bf16, device, dtype, expected):
    on_a_machine(monkeypatch, gpus, bf16)
    assert PlacementArguments(device=device, dtype=dtype).resolve() == (torch.device(expected[0]), expected[1])


@pytest.mark.parametrize(
    ("gpus", "device", "dtype", "message"),
    [
        (0, "cuda", "auto", "--device: cuda asked for, but torch .* sees no GPU"),
        (2, "cuda:2", "auto", r"--device: cuda:2 asked for, but torch sees 2 CUDA device\(s\)"),
        (0, "gpu", "auto", "--device: 'gpu' is not a device torch knows"),
        (0, "cpu", "fp8", "--dtype: 'fp8' is not one of auto, float32, bfloat16, float16"),
    ],
)
def test_a_device_the_machine_lacks_is_named(monkeypatch, gpus, device, dtype, message):
    on_a_machine(monkeypatch, gpus)
    with pytest.raises(ValueError, match=message):
        PlacementArguments(device=device, dtype=dtype).resolve()


@pytest.mark.parametrize(
    ("main", "argv"),
    [
        (chat_main, ["--model", "m"]),
        (batch_main, ["--model", "m", "--data", "d", "--output", "o"]),
        (serve_main, ["--model", "m"]),
        (demo_main, ["--model", "m"]),
        (eval_main, ["--model", "m", "--data", "d", "--output", "o"]),
    ],
    ids=["chat", "batch", "serve", "demo", "eval"],
)
def test_every_front_end_stops_with_one_line_for_a_missing_gpu(monkeypatch, main, argv):
    on_a_machine(monkeypatch, gpus=0)
    with pytest.raises(SystemExit, match="^error: --device: cuda asked for, but torch .* sees no GPU$"):
        main([*argv, "--device", "cuda"])


def test_an_engine_loads_in_the_dtype_asked_for_and_answers(checkpoint, engine):
    """bf16 on the CPU (the fast path on CPUs with bf16 matrix units): every weight bf16, next-token scores within
    bf16 rounding of the fp32 engine's, answers generated."""
    bf16_engine = InferenceEngine.from_checkpoint(checkpoint, "cpu", torch.bfloat16)
    assert {p.dtype for p in bf16_engine.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in engine.model.parameters()} == {torch.float32}  # as saved
    messages = [{"role": "user", "content": "<video>\nWhat moves?"}]
    batch = VideoCollator(engine.processor)([engine.processor.encode(messages, [make_video(3, 0)]).as_features()])
    with torch.no_grad():
        fp32_logits = engine.model(**batch).logits[:, -1]
        bf16_logits = bf16_engine.model(**batch).logits[:, -1].float()
    assert torch.allclose(bf16_logits, fp32_logits, atol=0.05 * fp32_logits.abs().max().item())
    answers = bf16_engine.generate([messages], [[make_video(3, 0)]], GenerationSettings(max_new_tokens=4))
    assert len(answers) == 1 and len(answers[0]) == 1 and isinstance(answers[0][0], str)


def test_make_preferences_names_a_missing_gpu(monkeypatch, capsys):
    """`data_tools/make_preferences.py` generates with a model too: the same flags, its own error convention."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "data_tools"))
    from make_preferences import main

    on_a_machine(monkeypatch, gpus=0)
    assert main(["--model", "m", "--input", "i", "--output", "o", "--device", "cuda"]) == 2
    assert capsys.readouterr().err.startswith("error: --device: cuda asked for, but torch")
