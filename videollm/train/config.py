"""Recipe configuration: dataclasses shared by every recipe, parsed from one YAML file plus CLI overrides.

The model and data keys are the same in SFT, DPO and self-training; each recipe adds its trainer's config (TRL's
or transformers') as the last dataclass. `parse_config` turns bad input into one clear line instead of a traceback.
"""

from __future__ import annotations

import difflib
import logging
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from trl import TrlParser

from videollm.data.robust import BAD_SAMPLE_ACTIONS
from videollm.data.sampling import SamplingSpec
from videollm.model.checkpoint import checkpoint_problem
from videollm.model.configuration import PROJECTOR_TYPES
from videollm.model.trainable import PART_SETTINGS, TrainablePolicy

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    """Which model to start from and what trains."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "a saved videollm checkpoint to start from (full or adapter)"}
    )
    vision_name_or_path: str | None = field(
        default=None, metadata={"help": "vision tower to build a new model from (hub name or dir), e.g. google/siglip-so400m-patch14-384"}
    )
    llm_name_or_path: str | None = field(
        default=None, metadata={"help": "LLM to build a new model from (hub name or dir), e.g. Qwen/Qwen2.5-7B-Instruct"}
    )
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": "tokenizer (default: the LLM's)"})
    tiny: bool = field(
        default=False, metadata={"help": "build a tiny random model and tokenizer from configs (demo, tests); no downloads"}
    )
    tiny_image_size: int = field(default=32, metadata={"help": "frame side of the tiny vision tower"})
    projector_type: str = field(
        default="mlp", metadata={"help": "mlp | pool | qformer | stc (a new model only; a checkpoint keeps its own)"}
    )
    pool_output_size: list[int] = field(
        default_factory=lambda: [16, 12, 12], metadata={"help": "pool projector output (frames cap, height, width)"}
    )
    num_query_tokens: int = field(default=32, metadata={"help": "qformer projector: visual tokens per video"})
    vision_feature_layer: int = field(default=-2, metadata={"help": "vision hidden layer used as features"})
    frame_embeddings: bool = field(
        default=True, metadata={"help": "add learned frame-index embeddings to frame features before the projector"}
    )
    tune_vision: str = field(default="frozen", metadata={"help": "vision tower: frozen | full"})
    tune_projector: str = field(default="full", metadata={"help": "projector: full | frozen"})
    tune_llm: str = field(default="lora", metadata={"help": "LLM: lora | full | frozen"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    attn_implementation: str | None = field(
        default=None,
        metadata={"help": "sdpa | sdpa_packed | eager | flash_attention_2 (packing: true turns sdpa into sdpa_packed); "
                  "default: flash_attention_2 on a GPU with flash-attn installed, else sdpa"},
    )  # fmt: skip
    model_dtype: str | None = field(
        default=None,
        metadata={"help": "dtype of every weight, trained ones included: float32 | bfloat16 | float16; default: frozen "
                  "weights in bf16 when training in bf16 on a GPU and trained ones in fp32, else fp32"},
    )  # fmt: skip

    def __post_init__(self) -> None:
        if self.model_name_or_path and (self.vision_name_or_path or self.llm_name_or_path):
            # A checkpoint given on the command line over a config that builds a new model: continuing from it is the
            # one thing that can mean (a checkpoint is never rebuilt from parts), so the parts step aside, and say so.
            logger.warning(
                "model_name_or_path: %s is loaded; vision_name_or_path %s and llm_name_or_path %s are ignored",
                self.model_name_or_path, self.vision_name_or_path, self.llm_name_or_path,
            )  # fmt: skip
            self.vision_name_or_path = self.llm_name_or_path = self.tokenizer_name_or_path = None
        sources = [bool(self.model_name_or_path), bool(self.vision_name_or_path or self.llm_name_or_path), self.tiny]
        if sum(sources) != 1:
            raise ValueError(
                "model: give exactly one of model_name_or_path, vision_name_or_path + llm_name_or_path, or tiny: true"
            )
        if self.tiny and self.tune_llm == "lora":
            raise ValueError(
                "tune_llm: lora trains an adapter over pretrained weights, and tiny: true builds random ones; use "
                "tune_llm: full, or save the tiny model and start LoRA from it with model_name_or_path"
            )
        if bool(self.vision_name_or_path) != bool(self.llm_name_or_path):
            raise ValueError("model: vision_name_or_path and llm_name_or_path go together")
        if self.projector_type not in PROJECTOR_TYPES:
            raise ValueError(f"projector_type: {self.projector_type!r} is not one of {' | '.join(PROJECTOR_TYPES)}")
        if self.model_name_or_path and (problem := checkpoint_problem(self.model_name_or_path)):
            raise ValueError(f"model_name_or_path: {problem}")
        for part, allowed in PART_SETTINGS.items():  # named by the recipe's key, which the policy's own check cannot
            if getattr(self, f"tune_{part}") not in allowed:
                raise ValueError(f"tune_{part}: {getattr(self, f'tune_{part}')!r} is not one of {' | '.join(allowed)}")
        self.policy()

    def policy(self) -> TrainablePolicy:
        return TrainablePolicy(
            vision=self.tune_vision,
            projector=self.tune_projector,
            llm=self.tune_llm,
            lora_r=self.lora_r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
        )

    def torch_dtype(self) -> torch.dtype | None:
        return getattr(torch, self.model_dtype) if self.model_dtype else None


@dataclass
class DataArguments:
    """Where the data is and how videos become frames."""

    train_file: str | None = field(default=None, metadata={"help": "training records: .jsonl, .json or .parquet"})
    eval_file: str | None = field(default=None, metadata={"help": "evaluation records (same formats)"})
    video_root: str | None = field(default=None, metadata={"help": "directory that relative video paths start from"})
    num_frames: int | None = field(
        default=None, metadata={"help": "uniformly sampled frames per video (default: the checkpoint's spec, else 8)"}
    )
    fps: float | None = field(default=None, metadata={"help": "sample at this rate instead (set num_frames to null)"})
    max_frames: int | None = field(default=None, metadata={"help": "cap on frames when sampling by fps"})
    timestamps_in_prompt: bool = field(default=False, metadata={"help": "tell the model when each frame was taken"})
    max_length: int | None = field(default=None, metadata={"help": "longest token sequence; visual tokens are never cut"})
    decode_backend: str = field(
        default="auto", metadata={"help": "auto | torchcodec | decord | pyav, or a reader function as module:function"}
    )
    decode_timeout: float = field(
        default=60.0,
        metadata={"help": "seconds one video may take to decode (in a separate process, killed past the limit)"},
    )
    bad_sample_policy: str = field(
        default="skip",
        metadata={
            "help": "a video that cannot be decoded: skip (replace the sample, log it, list it in "
            "output_dir/quarantine.jsonl) | error (stop at the first one)"
        },
    )
    max_bad_fraction: float = field(
        default=0.01,
        metadata={
            "help": "skip: stop once more than this fraction of a rank's samples is unreadable (of its share of the "
            "data, or of the samples seen once 1/max_bad_fraction were; see videollm.data.robust.exceeds_limit)"
        },
    )
    packing: bool = field(
        default=False,
        metadata={"help": "padding-free batches: each batch's samples in one row, positions restarting per sample "
                  "(flash-attention varlen on GPU, a block-diagonal mask with sdpa/eager); same steps and loss"},
    )  # fmt: skip
    feature_cache_dir: str | None = field(
        default=None,
        metadata={"help": "read frozen vision-tower (or tower + projector) outputs from this cache instead of decoding "
                  "videos; build it with data_tools/cache_features.py. A cache of other weights or spec is refused"},
    )  # fmt: skip

    def __post_init__(self) -> None:
        if self.bad_sample_policy not in BAD_SAMPLE_ACTIONS:
            raise ValueError(f"bad_sample_policy: {self.bad_sample_policy!r} is not one of {' | '.join(BAD_SAMPLE_ACTIONS)}")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction: must be between 0 and 1, got {self.max_bad_fraction}")
        if self.max_frames is not None and self.fps is None:
            # Without fps the checkpoint's spec (or num_frames) applies and the cap would be dropped without a word.
            raise ValueError(f"max_frames: {self.max_frames} caps sampling by rate only; set fps too, or use num_frames")
        if not self.decode_timeout > 0:
            raise ValueError(f"decode_timeout: must be a positive number of seconds, got {self.decode_timeout}")
        for name in ("train_file", "eval_file", "video_root"):
            value = getattr(self, name)
            if value is not None and not Path(value).exists():
                raise ValueError(f"{name}: {value} does not exist")
        self.sampling_spec()

    def sampling_spec(self) -> SamplingSpec | None:
        """The spec these keys ask for, or None when they leave the model's saved spec alone."""
        if self.num_frames is None and self.fps is None:
            return None
        return SamplingSpec(num_frames=self.num_frames if self.fps is None else None, fps=self.fps, max_frames=self.max_frames)

    def processor_overrides(self) -> dict[str, Any]:
        return {
            "timestamps_in_prompt": self.timestamps_in_prompt,
            "max_length": self.max_length,
            "backend": self.decode_backend,
            "decode_timeout": self.decode_timeout,
        }


class _RecipeParser(TrlParser):
    """TrlParser whose errors are one line (`error: ...`), without argparse's usage block."""

    def error(self, message: str) -> None:
        _fail(message)


def parse_config(dataclass_types: Sequence[type], args: Sequence[str] | None = None) -> tuple[Any, ...]:
    """Parse `--config FILE.yaml` plus `--key value` overrides into the dataclasses; exit with one line on bad input."""
    parser = _RecipeParser(list(dataclass_types))
    argv = list(args) if args is not None else sys.argv[1:]
    if "--config" in argv:
        index = argv.index("--config")
        if index + 1 >= len(argv) or not Path(argv[index + 1]).is_file():
            _fail(f"--config: file not found: {argv[index + 1] if index + 1 < len(argv) else '(missing)'}")
    try:
        *parsed, config_unknown, cli_unknown = parser.parse_args_and_config(
            argv, return_remaining_strings=True, separate_remaining_strings=True
        )
    except SystemExit:
        raise
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{mark.name}:{mark.line + 1}" if mark else argv[argv.index("--config") + 1]
        _fail(f"--config: {where}: not valid YAML ({getattr(error, 'problem', None) or error})")
    except (ValueError, TypeError, KeyError) as error:
        _fail(str(error).splitlines()[0] if str(error) else repr(error))
    parsed = tuple(parsed)
    known = [action.dest for action in parser._actions]
    if config_unknown:
        config_path = argv[argv.index("--config") + 1]
        _fail(_unknown_key_message(config_path, config_unknown[0].removeprefix("--"), known))
    if cli_unknown:
        flag = next((item for item in cli_unknown if item.startswith("-")), None)
        if flag is None:
            _fail(f"unexpected argument {cli_unknown[0]!r}: every setting is --key value")
        key = flag.removeprefix("--").split("=")[0].replace("-", "_")
        close = difflib.get_close_matches(key, known, n=1)
        _fail(f"{flag}: unknown argument" + (f" (did you mean --{close[0]}?)" if close else " (see --help)"))
    _check_training_numbers(parsed)
    _check_reporting(parsed)
    return parsed


def _unknown_key_message(config_path: str, key: str, known: Sequence[str]) -> str:
    """`FILE:LINE: unknown key KEY (did you mean ...?)`: a typo in a YAML config would otherwise train with the default."""
    line = next(
        (number for number, text in enumerate(Path(config_path).read_text().splitlines(), 1)
         if re.match(rf"\s*{re.escape(key)}\s*:", text)),
        None,
    )  # fmt: skip
    close = difflib.get_close_matches(key, known, n=1)
    where = f"{config_path}:{line}" if line else config_path
    return f"{where}: unknown key {key}" + (f" (did you mean {close[0]}?)" if close else "")


def _check_training_numbers(parsed: Sequence[Any]) -> None:
    """Counts the Trainer would take and fail on only after the model is built (a batch size of 0 in the sampler, a
    zero division for gradient accumulation), or quietly reinterpret (`max_steps: 0` trains for num_train_epochs)."""
    for config in parsed:
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            value = getattr(config, name, None)
            if value is not None and value < 1:
                _fail(f"{name}: must be >= 1, got {value}")
        max_steps = getattr(config, "max_steps", None)
        if max_steps is not None and max_steps != -1 and max_steps < 1:
            _fail(f"max_steps: must be >= 1 (or -1 to train for num_train_epochs), got {max_steps}")
        beta = getattr(config, "beta", None)
        if beta is not None and not beta > 0:
            # a negative beta flips the preference: the run would push the model toward the rejected answers
            _fail(f"beta: must be > 0, got {beta}")
        output_dir = getattr(config, "output_dir", None)
        if output_dir is not None and Path(output_dir).exists() and not Path(output_dir).is_dir():
            _fail(f"output_dir: {output_dir} is a file, not a directory")


def _check_reporting(parsed: Sequence[Any]) -> None:
    """A `report_to` integration that is not installed stops the run now, not once the model is built (the Trainer's
    callbacks check only then: minutes into a 7B run)."""
    from transformers.integrations import get_available_reporting_integrations

    for config in parsed:
        requested = [name for name in getattr(config, "report_to", None) or [] if name not in ("all", "none")]
        missing = [name for name in requested if name not in get_available_reporting_integrations()]
        if missing:
            _fail(f"report_to: {', '.join(missing)} is not installed: pip install {' '.join(missing)}, or --report_to none")


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)
