"""k-sample generation (videollm.infer.generate): one vision encode and one prefill per prompt, same answers as
transformers' generate on the same inputs."""

from __future__ import annotations

import pytest
import torch

from videollm.data.sampling import SamplingSpec
from videollm.data.video import DecodedVideo
from videollm.infer.generate import GenerationSettings, generate_answers
from videollm.model.presets import build_tiny_model_and_processor

FRAMES = 4
QUESTIONS = ["Which way?", "What colour is the long thing here, in a few words?", "Shape?", "Is it moving left or right?"]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model, processor = build_tiny_model_and_processor("mlp", sampling=SamplingSpec(num_frames=FRAMES))
    return model.eval(), processor


def video(seed: int) -> DecodedVideo:
    frames = torch.randint(0, 256, (FRAMES, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    return DecodedVideo(frames, list(range(FRAMES)), [float(t) for t in range(FRAMES)], float(FRAMES), f"v{seed}.mp4")


def prompts(n: int = len(QUESTIONS)):
    conversations = [[{"role": "user", "content": f"<video>\n{q}"}] for q in QUESTIONS[:n]]
    return conversations, [[video(i)] for i in range(n)]


def hf_generate(model, processor, conversations, videos, settings: GenerationSettings) -> list[str]:
    """transformers' generate on fully encoded inputs (every row with its own video), one answer per row."""
    batch = processor(conversations, videos)
    output = model.generate(**batch, **settings.generate_kwargs(processor))
    return [t.strip() for t in processor.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)]


def count_vision_frames(model) -> list[int]:
    frames_per_call: list[int] = []
    model.model.vision_tower.register_forward_hook(
        lambda module, args, kwargs, output: frames_per_call.append(kwargs["pixel_values"].shape[0]), with_kwargs=True
    )
    return frames_per_call


def test_k_samples_share_one_vision_encode_per_prompt(tiny):
    model, processor = tiny
    frames_per_call = count_vision_frames(model)
    conversations, videos = prompts()
    settings = GenerationSettings(max_new_tokens=5, do_sample=True, num_return_sequences=3)
    answers = generate_answers(model, processor, conversations, videos, settings)
    assert [len(a) for a in answers] == [3] * len(QUESTIONS)
    assert frames_per_call == [len(QUESTIONS) * FRAMES]  # one pass for the batch: each video once, not k times
    frames_per_call.clear()
    generate_answers(model, processor, conversations, videos, settings, batch_size=2)
    assert frames_per_call == [2 * FRAMES, 2 * FRAMES]


def test_greedy_k_samples_equal_naive_per_sample_generation(tiny):
    model, processor = tiny
    conversations, videos = prompts()
    settings = GenerationSettings(max_new_tokens=12, num_return_sequences=2)
    shared = generate_answers(model, processor, conversations, videos, settings)
    naive = [
        [hf_generate(model, processor, [c], [v], settings)[0] for _ in range(settings.num_return_sequences)]
        for c, v in zip(conversations, videos)
    ]
    assert shared == naive
    assert len({a for answers in shared for a in answers}) > 1  # different prompts, different answers


def test_sampled_answers_equal_generate_on_repeated_prompts_with_the_same_seed(tiny):
    """The k copies decode exactly as k encoded copies of the prompt would: the same random draws, the same answers."""
    model, processor = tiny
    conversations, videos = prompts()
    k = 3
    settings = GenerationSettings(max_new_tokens=10, do_sample=True, temperature=1.5, top_p=0.95, num_return_sequences=k)
    torch.manual_seed(7)
    shared = generate_answers(model, processor, conversations, videos, settings)
    torch.manual_seed(7)
    repeated = hf_generate(model, processor, [c for c in conversations for _ in range(k)], [v for v in videos for _ in range(k)], settings)
    assert shared == [repeated[i * k : (i + 1) * k] for i in range(len(conversations))]
    assert all(len(set(answers)) > 1 for answers in shared)  # the k samples are drawn independently
    torch.manual_seed(7)
    assert generate_answers(model, processor, conversations, videos, settings) == shared  # seeded: repeatable


def test_batched_prompts_answer_as_each_prompt_alone(tiny):
    model, processor = tiny
    conversations, videos = prompts()
    settings = GenerationSettings(max_new_tokens=8)
    together = generate_answers(model, processor, conversations, videos, settings)
    alone = [generate_answers(model, processor, [c], [v], settings)[0] for c, v in zip(conversations, videos)]
    assert together == alone == [[a] for a in hf_generate(model, processor, conversations, videos, settings)]
    assert generate_answers(model, processor, conversations, videos, settings, batch_size=3) == together


def test_an_unmerged_lora_model_generates_like_transformers(tiny, tmp_path):
    from videollm.model.checkpoint import load_model, save_checkpoint
    from videollm.model.trainable import TrainablePolicy, apply_trainable_policy

    model, processor = tiny
    save_checkpoint(model, processor, tmp_path)  # LoRA goes on a saved base
    lora = apply_trainable_policy(load_model(tmp_path)[0], TrainablePolicy(llm="lora", projector="frozen", lora_r=4)).eval()
    with torch.no_grad():  # a LoRA that changes the model
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    conversations, videos = prompts(2)
    settings = GenerationSettings(max_new_tokens=8, num_return_sequences=2)
    answers = generate_answers(lora, processor, conversations, videos, settings)
    assert answers == [[a, a] for a in hf_generate(lora, processor, conversations, videos, settings)]
    assert type(lora).__name__.startswith("Peft")
    assert answers != generate_answers(model, processor, conversations, videos, settings)


def test_text_only_prompts_and_bad_settings(tiny):
    model, processor = tiny
    conversations = [[{"role": "user", "content": "Say something."}]]
    settings = GenerationSettings(max_new_tokens=4)
    assert generate_answers(model, processor, conversations, [[]], settings) == [hf_generate(model, processor, conversations, [[]], settings)]
    with pytest.raises(ValueError, match="num_return_sequences must be >= 1"):
        generate_answers(model, processor, conversations, [[]], GenerationSettings(num_return_sequences=0))
