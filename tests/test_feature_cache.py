"""The vision-feature cache: same samples and loss as decoding, never stale, wired into the SFT recipe."""

from __future__ import annotations

import json
import os
import runpy
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from data_tools.cache_features import main as cache_features
from videollm.data.dataset import ConversationDataset, VideoCollator
from videollm.data.feature_cache import (
    CachedFeatureDataset,
    FeatureCache,
    FeatureCacheError,
    FeatureCacheWriter,
    cache_identity,
    encode_videos,
)
from videollm.data.formats import load_conversations
from videollm.data.packing import PackingCollator
from videollm.data.sampling import SamplingSpec
from videollm.data.video import VideoDecodeError, write_video
from videollm.infer.generate import generate_answers
from videollm.model.checkpoint import load_model, save_checkpoint
from videollm.model.presets import build_tiny_model_and_processor
from videollm.model.trainable import TrainablePolicy, apply_trainable_policy

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = [("What color is it?", "red"), ("Which way does it move?", "left"), ("What shape?", "a circle")]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Three 16-frame clips and four conversations (one clip asked about twice)."""
    root = tmp_path_factory.mktemp("cache_data")
    (root / "videos").mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        write_video(root / "videos" / f"clip{i}.mp4", rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8))
    lines = []
    for i, (question, answer) in enumerate([*QUESTIONS, QUESTIONS[0]]):
        conversation = [{"from": "human", "value": f"<video>\n{question}"}, {"from": "gpt", "value": answer}]
        lines.append(json.dumps({"id": f"s{i}", "video": f"videos/clip{i % 3}.mp4", "conversations": conversation}))
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model, processor = build_tiny_model_and_processor("pool", sampling=SamplingSpec(num_frames=4))
    path = tmp_path_factory.mktemp("ckpt")
    save_checkpoint(model, processor, path)
    return path


def load(checkpoint: Path, projector: str = "full"):
    """The checkpoint as the recipe would train it: frozen tower, the projector as asked, full LLM."""
    model, processor = load_model(checkpoint)
    model = apply_trainable_policy(model, TrainablePolicy(vision="frozen", projector=projector, llm="full"))
    processor.decode_timeout = None  # decode in this process (no decode worker to start)
    return model.train(), processor


def cli_args(data: Path, checkpoint: Path, cache_dir: Path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", str(checkpoint), "--tune_vision", "frozen", "--tune_llm", "full",
        "--train_file", str(data / "train.jsonl"), "--video_root", str(data), "--feature_cache_dir", str(cache_dir),
        "--output_dir", str(cache_dir / "unused"), "--use_cpu", "true", "--report_to", "none",
        "--dataloader_num_workers", "0", "--cache_batch_videos", "2", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def tower_cache(data, checkpoint, tmp_path_factory) -> Path:
    """A tower-level cache written by the command-line tool (the projector trains, so the tower level is chosen)."""
    cache_dir = tmp_path_factory.mktemp("tower_cache")
    assert cache_features(cli_args(data, checkpoint, cache_dir)) == 0
    return cache_dir


def losses(model, batches: list[dict]) -> list[float]:
    return [model(**batch).loss.item() for batch in batches]


def test_cached_samples_and_loss_equal_decoded(data, checkpoint, tower_cache):
    model, processor = load(checkpoint)
    records = load_conversations(data / "train.jsonl", video_root=data)
    cache = FeatureCache.open(tower_cache, model, processor, video_root=data)
    assert cache.level == "tower"
    cached, decoded = CachedFeatureDataset(records, processor, cache), ConversationDataset(records, processor)
    for index in range(len(records)):
        ours, theirs = cached[index], decoded[index]
        assert ours["input_ids"] == theirs["input_ids"] and ours["labels"] == theirs["labels"]
        with torch.no_grad():
            expected = model.model.encode_frames(theirs["pixel_values_videos"])
        assert torch.allclose(ours["video_frame_features"], expected, atol=1e-5)

    tower_calls = []
    model.model.vision_tower.register_forward_hook(lambda *args: tower_calls.append(1))
    samples = [cached[i] for i in range(len(records))]
    with_cache = losses(model, [VideoCollator(processor)(samples), PackingCollator()(samples)])
    assert tower_calls == []  # the tower never ran: the cache replaced it
    decoded_loss = losses(model, [VideoCollator(processor)([decoded[i] for i in range(len(records))])])[0]
    assert with_cache == pytest.approx([decoded_loss, decoded_loss], abs=1e-5)


def test_rerun_resumes_without_decoding(data, checkpoint, tower_cache, capsys):
    assert cache_features(cli_args(data, checkpoint, tower_cache)) == 0
    assert "3 videos, 3 already cached" in capsys.readouterr().out


@pytest.mark.parametrize("dtype", ["bf16", "int8", "Tensor"])
def test_a_cache_dtype_that_is_no_float_dtype_stops_before_anything_is_written(data, checkpoint, tmp_path, dtype):
    with pytest.raises(SystemExit, match=f"cache_dtype: '{dtype}' is not a floating-point torch dtype"):
        cache_features(cli_args(data, checkpoint, tmp_path / "cache", "--cache_dtype", dtype))
    assert not (tmp_path / "cache").exists()


def test_projector_level_cache(data, checkpoint, tmp_path):
    """Frozen tower and projector: projector outputs are cached and passed as `video_embeds`."""
    model, processor = load(checkpoint, projector="frozen")
    records = load_conversations(data / "train.jsonl", video_root=data)
    writer = FeatureCacheWriter(tmp_path, cache_identity(model, processor, "projector"), video_root=data)
    for path in dict.fromkeys(p for r in records for p in r.videos):
        video = processor.load_video(path)
        writer.add(path, encode_videos(model, processor.pixel_values(video), [len(video.indices)], "projector")[0], video)
    writer.close()
    cache = FeatureCache.open(tmp_path, model, processor, video_root=data)
    assert cache.level == "projector"
    batch = VideoCollator(processor)([CachedFeatureDataset(records, processor, cache)[0]])
    assert "video_embeds" in batch and "pixel_values_videos" not in batch
    decoded = VideoCollator(processor)([ConversationDataset(records, processor)[0]])
    assert losses(model, [batch]) == pytest.approx(losses(model, [decoded]), abs=1e-5)


@pytest.mark.parametrize("projector", ["full", "frozen"])
def test_generation_from_cached_videos_gives_the_answers_of_decoded_ones(data, checkpoint, tmp_path, projector):
    """`generate_answers` takes videos read from the cache: the same greedy answers, and the tower never runs."""
    cache_dir = tmp_path / "cache"
    assert cache_features(cli_args(data, checkpoint, cache_dir, "--tune_projector", projector)) == 0
    model, processor = load(checkpoint, projector=projector)
    model.eval()
    cache = FeatureCache.open(cache_dir, model, processor, video_root=data)
    assert cache.level == {"full": "tower", "frozen": "projector"}[projector]
    records = load_conversations(data / "train.jsonl", video_root=data)
    conversations = [[{"role": "user", "content": f"<video>\n{question}"}] for question, _ in QUESTIONS]
    decoded = generate_answers(model, processor, conversations, [[processor.load_video(r.videos[0])] for r in records[:3]])
    tower_calls = []
    model.model.vision_tower.register_forward_hook(lambda *args: tower_calls.append(1))
    cached = generate_answers(model, processor, conversations, [[cache.get(r.videos[0])] for r in records[:3]])
    assert cached == decoded and tower_calls == []


def test_other_weights_spec_or_video_are_refused(data, checkpoint, tower_cache):
    model, processor = load(checkpoint)
    records = load_conversations(data / "train.jsonl", video_root=data)

    with torch.no_grad():
        next(model.model.vision_tower.parameters()).add_(1e-3)
    with pytest.raises(FeatureCacheError, match="another vision tower"):
        FeatureCache.open(tower_cache, model, processor, video_root=data)

    model, processor = load(checkpoint)
    processor.sampling = {**processor.sampling, "num_frames": 6}
    with pytest.raises(FeatureCacheError, match="sampling spec"):
        FeatureCache.open(tower_cache, model, processor, video_root=data)

    model, processor = load(checkpoint)
    model.model.vision_tower.requires_grad_(True)
    with pytest.raises(FeatureCacheError, match="vision tower trains"):
        FeatureCache.open(tower_cache, model, processor, video_root=data)

    model, processor = load(checkpoint)
    cache = FeatureCache.open(tower_cache, model, processor, video_root=data)
    clip = Path(records[0].videos[0])
    stat = clip.stat()
    os.utime(clip, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    try:
        with pytest.raises(FeatureCacheError, match="changed on disk"):
            CachedFeatureDataset(records, processor, cache)
    finally:
        os.utime(clip, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    uncached = load_conversations(data / "train.jsonl", video_root=data)[:1]
    uncached[0].videos = [str(data / "videos" / "elsewhere.mp4")]
    with pytest.raises(FeatureCacheError, match="not cached"):
        CachedFeatureDataset(uncached, processor, cache)


def _write_png(path: Path, value: int) -> None:
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("png")
        stream.width, stream.height, stream.pix_fmt = 32, 32, "rgb24"
        frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), value, dtype=np.uint8), format="rgb24")
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def test_a_frame_folder_whose_frames_are_overwritten_is_refused(checkpoint, tmp_path):
    """Re-extracting frames under the same names leaves the folder's own size and mtime as they were."""
    model, processor = load(checkpoint)
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(4):
        _write_png(folder / f"{i:03d}.png", 40 * i)
    writer = FeatureCacheWriter(tmp_path / "cache", cache_identity(model, processor, "tower"), video_root=tmp_path)
    video = processor.load_video(folder)
    writer.add(folder, encode_videos(model, processor.pixel_values(video), [len(video.indices)], "tower")[0], video)
    writer.close()
    cache = FeatureCache.open(tmp_path / "cache", model, processor, video_root=tmp_path)
    cache.check([folder])

    folder_stat = folder.stat()
    _write_png(folder / "001.png", 250)
    frame_stat = (folder / "001.png").stat()
    os.utime(folder / "001.png", ns=(frame_stat.st_atime_ns, frame_stat.st_mtime_ns + 10**9))
    assert (folder.stat().st_size, folder.stat().st_mtime_ns) == (folder_stat.st_size, folder_stat.st_mtime_ns)
    with pytest.raises(FeatureCacheError, match="changed on disk"):
        cache.check([folder])
    assert folder not in FeatureCacheWriter(tmp_path / "cache", writer.identity, video_root=tmp_path)


def test_unreadable_video_goes_to_the_bad_sample_policy(checkpoint, tmp_path):
    model, processor = load(checkpoint)
    writer = FeatureCacheWriter(tmp_path, cache_identity(model, processor, "tower"), video_root=tmp_path)
    writer.add_unreadable(tmp_path / "broken.mp4", "no video stream")
    writer.close()
    cache = FeatureCache.open(tmp_path, model, processor, video_root=tmp_path)
    with pytest.raises(VideoDecodeError, match="no video stream"):
        cache.get(tmp_path / "broken.mp4")


def test_a_rerun_tries_an_unreadable_video_again(data, checkpoint, tmp_path, monkeypatch, capsys):
    """A decode that failed once (a timeout on a busy machine) is not taken as the video's last word."""
    from videollm.data.processor import VideoLLMProcessor

    load_video = VideoLLMProcessor.load_video

    def timing_out(processor, path):
        if Path(path).name == "clip1.mp4":
            raise VideoDecodeError(str(path), "timed out after 60 s")
        return load_video(processor, path)

    monkeypatch.setattr(VideoLLMProcessor, "load_video", timing_out)
    assert cache_features(cli_args(data, checkpoint, tmp_path / "cache")) == 0
    assert "1 unreadable" in capsys.readouterr().out
    monkeypatch.setattr(VideoLLMProcessor, "load_video", load_video)
    assert cache_features(cli_args(data, checkpoint, tmp_path / "cache")) == 0
    assert "3 videos, 2 already cached" in capsys.readouterr().out
    model, processor = load(checkpoint)
    cache = FeatureCache.open(tmp_path / "cache", model, processor, video_root=data)
    cache.check([data / "videos" / f"clip{i}.mp4" for i in range(3)])
    assert cache.get(data / "videos" / "clip1.mp4").indices == processor.load_video(data / "videos" / "clip1.mp4").indices


def test_sft_recipe_trains_from_the_cache_with_packing(data, checkpoint, tower_cache, tmp_path, monkeypatch, capsys):
    args = cli_args(data, checkpoint, tower_cache)[:-2]  # without the cache tool's own --cache_batch_videos
    args[args.index("--output_dir") + 1] = str(tmp_path / "out")
    monkeypatch.setattr(sys, "argv", ["sft.py", *args, "--packing", "true", "--max_steps", "2",
                                      "--per_device_train_batch_size", "2", "--save_strategy", "no"])  # fmt: skip
    runpy.run_path(str(REPO / "recipes" / "sft.py"), run_name="__main__")
    assert "finished after 2 steps" in capsys.readouterr().out


def test_sft_recipe_stops_with_one_line_on_a_cache_of_another_spec(data, checkpoint, tower_cache, tmp_path, monkeypatch):
    args = cli_args(data, checkpoint, tower_cache)[:-2]
    args[args.index("--output_dir") + 1] = str(tmp_path / "out")
    monkeypatch.setattr(sys, "argv", ["sft.py", *args, "--num_frames", "6", "--max_steps", "1"])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(REPO / "recipes" / "sft.py"), run_name="__main__")
    message = str(stop.value.code)
    assert message.startswith("error: ") and "sampling spec" in message and "\n" not in message
    assert not (tmp_path / "out").exists()
