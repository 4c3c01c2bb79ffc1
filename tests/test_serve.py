"""The OpenAI-compatible server, driven by the official `openai` client against a server started on a free port."""

from __future__ import annotations

import base64
import os
import re
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
import uvicorn

from videollm.data.processor import VideoLLMProcessor
from videollm.data.sampling import SamplingSpec
from videollm.data.synthetic import SyntheticConfig, generate_dataset
from videollm.infer.generate import GenerationSettings
from videollm.infer.serve import create_app
from videollm.model.checkpoint import save_checkpoint
from videollm.model.presets import build_tiny_model_and_processor

MODEL = "tiny-video"
MAX_UPLOAD = 256 * 1024
QUESTION = "What color is the shape?"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model, processor = build_tiny_model_and_processor("pool", sampling=SamplingSpec(num_frames=3))
    path = tmp_path_factory.mktemp("ckpt")
    save_checkpoint(model, processor, path)
    return path


@pytest.fixture(scope="module")
def media_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    generate_dataset(SyntheticConfig(output_dir=str(root), num_train=0, num_eval=0, num_test=2))
    (root / "broken.mp4").write_bytes(b"\x00\x01 not a video")
    return root


@pytest.fixture(scope="module")
def base_url(engine, media_root):
    app = create_app(engine, MODEL, media_root, GenerationSettings(max_new_tokens=6), max_upload_bytes=MAX_UPLOAD)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.fixture
def client(base_url):
    return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)


def video_message(url: str, text: str = QUESTION) -> list[dict]:
    return [
        {"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": text}]}
    ]


def data_url(data: bytes) -> str:
    return "data:video/mp4;base64," + base64.b64encode(data).decode()


CLIP = "videos/test/test_00000.mp4"


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_non_streamed_answer_for_a_path_under_the_media_root(client, engine, media_root, checkpoint, encoded):
    completion = client.chat.completions.create(model=MODEL, messages=video_message(CLIP), max_tokens=6)

    (choice,) = completion.choices
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    video = engine.load_video(media_root / CLIP)
    expected = engine.generate(
        [[{"role": "user", "content": f"<video>\n{QUESTION}"}]], [[video]], GenerationSettings(max_new_tokens=6)
    )
    assert choice.message.content == expected[0][0] != ""

    # the frames of training: the checkpoint's processor as the training dataset uses it, not the default spec
    processor = VideoLLMProcessor.from_pretrained(checkpoint)
    processor.decode_timeout = None  # decode in this process: the same frames, without starting a decode worker
    assert encoded[0] == [list(processor.load_video(media_root / CLIP).indices)] == [[1, 4, 7]]


def test_streamed_answer_from_a_base64_upload(client, media_root, encoded):
    upload = data_url((media_root / CLIP).read_bytes())
    stream = client.chat.completions.create(
        model=MODEL, messages=video_message(upload), max_tokens=6, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]

    assert len(pieces) > 1 and finish in (["stop"], ["length"])
    assert chunks[-1].usage.completion_tokens >= len(pieces)
    plain = client.chat.completions.create(model=MODEL, messages=video_message(CLIP), max_tokens=6)
    assert "".join(pieces).strip() == plain.choices[0].message.content
    assert encoded == [[[1, 4, 7]], [[1, 4, 7]]]


def test_sse_wire_format(base_url):
    body = {"model": MODEL, "messages": video_message(CLIP), "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{base_url}/chat/completions", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


@pytest.mark.parametrize(
    ("url", "status", "message"),
    [
        ("../../etc/passwd", 403, "outside the server's media root"),
        ("/etc/passwd", 403, "outside the server's media root"),
        ("file:///etc/passwd", 403, "outside the server's media root"),
        ("videos/test/missing.mp4", 404, "not found under the media root"),
        ("broken.mp4", 400, "cannot read 'broken.mp4'"),
        (data_url(b"\x00garbage" * 50), 400, "cannot read the uploaded video"),
        ("data:video/mp4;base64,@@@", 400, "not valid base64"),
        ("https://example.com/a.mp4", 400, "remote URLs are not fetched"),
        (data_url(os.urandom(MAX_UPLOAD)), 413, "larger than the server's limit of 0.25 MiB"),
    ],
)
def test_bad_videos_get_a_clear_4xx_and_the_server_keeps_serving(client, url, status, message):
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model=MODEL, messages=video_message(url), max_tokens=2)
    assert caught.value.status_code == status
    assert message in caught.value.message
    assert client.chat.completions.create(model=MODEL, messages=video_message(CLIP), max_tokens=2).choices


def test_request_errors_are_openai_error_objects(client):
    with pytest.raises(openai.NotFoundError, match="this server serves 'tiny-video'"):
        client.chat.completions.create(model="gpt-4o", messages=video_message(CLIP))
    with pytest.raises(openai.BadRequestError, match="last message must come from the user"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "assistant", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="image_url parts are not supported"):
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "a.png"}}]}]
        )


def test_a_seeded_sampled_request_gives_the_same_answer_again(client, engine, media_root):
    def ask(seed: int, **kwargs) -> list[str]:
        completion = client.chat.completions.create(
            model=MODEL, messages=video_message(CLIP), max_tokens=6, temperature=1.0, n=2, seed=seed, **kwargs
        )
        return [choice.message.content for choice in completion.choices]

    first = ask(7)
    torch.rand(5)  # whatever the global generator went through in between
    assert ask(7) == first
    video = engine.load_video(media_root / CLIP)
    settings = GenerationSettings(max_new_tokens=6, do_sample=True, temperature=1.0, num_return_sequences=2)
    messages = [{"role": "user", "content": f"<video>\n{QUESTION}"}]
    assert engine.generate([messages], [[video]], settings, seed=7)[0] == first

    def streamed(seed: int) -> str:
        stream = client.chat.completions.create(
            model=MODEL, messages=video_message(CLIP), max_tokens=6, temperature=1.0, seed=seed, stream=True
        )
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    assert streamed(3) == streamed(3)


def test_a_body_that_is_not_utf8_gets_a_400_not_a_500(base_url):
    body = '{"messages": [{"role": "user", "content": "caf\u00e9"}]}'.encode("latin-1")
    response = httpx.post(
        f"{base_url}/chat/completions", content=body, headers={"content-type": "application/json"}, timeout=60
    )
    assert response.status_code == 400
    assert "not UTF-8 encoded JSON" in response.json()["error"]["message"]


def test_twenty_concurrent_requests_are_all_answered(client, base_url):
    def ask(i: int) -> str:
        own = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=300)
        if i % 2:
            stream = own.chat.completions.create(model=MODEL, messages=video_message(CLIP), max_tokens=4, stream=True)
            return "".join(c.choices[0].delta.content or "" for c in stream if c.choices).strip()
        return (
            own.chat.completions.create(model=MODEL, messages=video_message(CLIP), max_tokens=4)
            .choices[0]
            .message.content
        )

    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(ask, range(20)))
    # one lock around the model: the same greedy answer for every request, however they interleaved
    assert len(answers) == 20 and len(set(answers)) == 1 and answers[0]


def test_entry_point_binds_loopback_by_default(checkpoint, media_root):
    args = ["-m", "videollm.serve", "--model", str(checkpoint), "--media_root", str(media_root), "--port", "0"]
    process = subprocess.Popen([sys.executable, *args], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = process.stderr.readline()
            found = re.search(r"Uvicorn running on http://([\d.]+):(\d+)", line)
            if found or not line:
                break
        assert found, "the server did not start"
        assert found.group(1) == "127.0.0.1"
        models = httpx.get(f"http://127.0.0.1:{found.group(2)}/v1/models", timeout=30).json()
        assert models["data"][0]["id"] == checkpoint.name
    finally:
        process.terminate()
        process.wait(timeout=30)
