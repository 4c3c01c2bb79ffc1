"""A tiny byte-level BPE tokenizer built locally, for tests and the demo (no hub access on our machines).

It speaks ChatML like Qwen, so the same processor code path serves the tiny models and real checkpoints.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

VIDEO_TOKEN = "<video>"
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", VIDEO_TOKEN)

# transformers renders templates with trim_blocks, so newlines are written as '\n' string literals, never after a tag.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_DEFAULT_CORPUS = (
    "In which direction does the red circle move? It moves to the left. The green square moves right. "
    "What color is the shape? The shape is blue. What shape is it? It is a yellow triangle. "
    "Which way is the object travelling? Up, down, left or right. Answer with one word. "
    "A. left B. right C. up D. down. The video lasts 1.0 s; 8 frames sampled at 0.0s, 0.1s. "
    "Describe the video. A person walks, runs, jumps, sits and stands. How many objects are there? "
    "Yes. No. The answer is correct because the object moves from one side to the other over time. "
    "first then after before start end seconds frame frames clip camera scene motion fast slow "
    "0 1 2 3 4 5 6 7 8 9 10 zero one two three four five six seven eight nine ten"
)


def build_tiny_tokenizer(corpus: Iterable[str] | None = None, vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """Train a deterministic byte-level BPE tokenizer with ChatML special tokens and a chat template."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        # the alphabet comes back in a different order in each process; sorted, the vocabulary is reproducible
        initial_alphabet=sorted(pre_tokenizers.ByteLevel.alphabet()),
        show_progress=False,
    )
    texts = list(corpus) if corpus is not None else [_DEFAULT_CORPUS] * 4
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=[VIDEO_TOKEN],
        chat_template=CHATML_TEMPLATE,
        model_max_length=8192,
    )
