"""Build DPO preference pairs from a model's own answers on labelled video questions.

    # TEMPLE / RRPO: clean-video answer (chosen) vs perturbed-video answer (rejected), one stage file per magnitude
    python data_tools/make_preferences.py --model outputs/sft_tiny --input data/synthetic/labels_train.jsonl \\
        --video_root data/synthetic --types direction --mode perturb --perturbations reverse:8 shuffle:8 reverse:4 \\
        shuffle:4 --output data/prefs/temporal.jsonl --curriculum_dir data/prefs/curriculum
    # LLaVA-Hound / Video-STaR: k sampled answers, a verifier against the label picks chosen and rejected
    python data_tools/make_preferences.py --model outputs/sft_tiny --input data/synthetic/labels_train.jsonl \\
        --video_root data/synthetic --mode verify --do_sample true --temperature 1.0 --top_p 0.95 \\
        --num_return_sequences 4 --output data/prefs/verified.jsonl

On several processes (`accelerate launch --num_processes N data_tools/make_preferences.py ...`, one GPU each) the
questions are shared out by batch; each batch samples from its own seed, so the pairs are those one process makes.
A question whose video does not decode is skipped with a warning that names it. A build writes each batch's pairs to
`<output>.progress/` as they come: run the same command again after a crash and only the batches left are answered
(other settings stop with an error that names them). The folder is removed once the output is written.

The output files are preference JSONL for recipes/dpo.py (`--train_file`, or `--round_train_files` with the stage
files in the printed order for a curriculum).
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

from videollm.data.formats import DataValidationError, load_labelled, write_jsonl
from videollm.infer.generate import GenerationSettings
from videollm.infer.placement import PlacementArguments, load_for_inference
from videollm.infer.processes import Processes
from videollm.model.checkpoint import checkpoint_problem
from videollm.selftrain.preferences import PERTURBATIONS
from videollm.selftrain.runs import RunDirectory, RunSettingsMismatch, SampleLog
from videollm.selftrain import (
    PairFilter,
    exclusive_class_verifiers,
    model_answerer,
    prompts_from_labelled,
    temporal_pairs,
    verified_pairs,
    write_curriculum,
)


@dataclass
class BuildArguments:
    """Where the questions come from, which model answers them, and how pairs are formed."""

    model: str = field(metadata={"help": "videollm checkpoint that answers (usually the SFT model to be aligned)"})
    input: str = field(metadata={"help": "labelled records (question, label, video): .jsonl, .json or .parquet"})
    output: str = field(metadata={"help": "preference JSONL to write"})
    video_root: str | None = field(default=None, metadata={"help": "directory that relative video paths start from"})
    mode: str = field(default="perturb", metadata={"help": "perturb (TEMPLE/RRPO) | verify (sample k, check the label)"})
    types: list[str] | None = field(default=None, metadata={"help": "keep only records whose 'type' is one of these"})
    limit: int | None = field(default=None, metadata={"help": "use at most this many records"})
    perturbations: list[str] = field(
        default_factory=lambda: ["reverse:8", "shuffle:8", "reverse:4", "shuffle:4", "reverse:2", "shuffle:2"],
        metadata={"help": "perturb: kind:magnitude, kind in shuffle | reverse | drop, magnitude = frames touched"},
    )
    curriculum_dir: str | None = field(default=None, metadata={"help": "perturb: also write one file per magnitude here"})
    hard_first: bool = field(default=False, metadata={"help": "curriculum from small (hard) to large magnitudes"})
    min_length_ratio: float = field(default=0.5, metadata={"help": "perturb: shortest rejected/chosen length ratio"})
    max_length_ratio: float = field(default=2.0, metadata={"help": "perturb: longest rejected/chosen length ratio"})
    max_pairs_per_prompt: int = field(default=1, metadata={"help": "verify: pairs drawn per question"})
    batch_size: int = field(default=8, metadata={"help": "questions answered together"})
    seed: int = field(default=0, metadata={"help": "seed of perturbation windows, pair draws and sampling"})

    def __post_init__(self) -> None:
        if self.mode not in ("perturb", "verify"):
            raise ValueError(f"mode: {self.mode!r} is not one of perturb | verify")
        for name in ("batch_size", "max_pairs_per_prompt", "limit"):
            value = getattr(self, name)
            if value is not None and value < 1:  # a negative limit would quietly drop the last records instead
                raise ValueError(f"--{name}: must be >= 1, got {value}")
        if not 0 < self.min_length_ratio <= self.max_length_ratio:
            raise ValueError(
                f"--min_length_ratio {self.min_length_ratio} and --max_length_ratio {self.max_length_ratio}: need "
                "0 < min_length_ratio <= max_length_ratio"
            )
        if Path(self.output).is_dir():
            suggestion = Path(self.output) / "pairs.jsonl"
            raise ValueError(f"--output: {self.output} is a directory; give the preference file, e.g. {suggestion}")
        self.perturbation_list()

    def perturbation_list(self) -> list[tuple[str, int]]:
        """`perturbations` as (kind, magnitude) pairs; ValueError, before any model is loaded, for one that
        `perturb_video` would refuse only once the build is under way."""
        parsed = []
        for item in self.perturbations:
            kind, _, magnitude = item.partition(":")
            if not magnitude.isdigit():
                raise ValueError(f"perturbations: {item!r} is not kind:magnitude (e.g. reverse:8)")
            if kind not in PERTURBATIONS:
                raise ValueError(f"perturbations: {item!r}: the kind must be one of {' | '.join(PERTURBATIONS)}")
            least = 1 if kind == "drop" else 2  # reordering one frame changes nothing
            if int(magnitude) < least:
                raise ValueError(f"perturbations: {item!r}: {kind} needs a magnitude of at least {least} frames")
            parsed.append((kind, int(magnitude)))
        return parsed


def build_settings(args: BuildArguments, settings: GenerationSettings) -> dict:
    """What decides the pairs a build writes, which a rerun must share to resume it. Where the pairs and the curriculum
    go may change (they are written at the end), and so may the device (a build may move to another machine)."""
    chosen = {k: v for k, v in dataclasses.asdict(args).items() if k not in ("output", "curriculum_dir", "hard_first")}
    return {**chosen, "model": str(Path(args.model).resolve()), "input": str(Path(args.input).resolve()),
            "generation": settings.to_dict()}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    description = __doc__.splitlines()[0]
    parser = HfArgumentParser([BuildArguments, PlacementArguments, GenerationSettings], description=description)
    try:
        args, placement, settings = parser.parse_args_into_dataclasses(args=list(argv) if argv is not None else None)
        device, dtype = placement.resolve()
        if problem := checkpoint_problem(args.model):
            raise ValueError(f"--model: {problem}")
        if problem := settings.problem():
            raise ValueError(problem)
        records = load_labelled(args.input, video_root=args.video_root)
    except (ValueError, DataValidationError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.types:
        records = [r for r in records if r.meta.get("type") in args.types]
    prompts = prompts_from_labelled(records[: args.limit])
    if args.mode == "verify" and (settings.num_return_sequences < 2 or not settings.do_sample):
        message = "mode verify samples several answers: set --do_sample true --num_return_sequences k (k >= 2)"
        print(f"error: {message}", file=sys.stderr)
        return 2

    processes = Processes.launched()
    progress = Path(f"{args.output}.progress")
    try:
        RunDirectory(progress, build_settings(args, settings), processes=processes, name="the progress folder",
                     fresh_start="delete it").open()  # fmt: skip
    except RunSettingsMismatch as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    model, processor = load_for_inference(args.model, processes.place(device), dtype)
    answer = model_answerer(model, processor, settings)
    log = SampleLog(progress / "batches.jsonl", processes)
    common = dict(load_video=processor.load_video, seed=args.seed, video_root=args.video_root,
                  batch_size=args.batch_size, processes=processes, log=log, processor=processor)  # fmt: skip
    if args.mode == "perturb":
        pair_filter = PairFilter(args.min_length_ratio, args.max_length_ratio)
        rows, report = temporal_pairs(prompts, answer, perturbations=args.perturbation_list(), pair_filter=pair_filter, **common)
    else:
        rows, report = verified_pairs(prompts, answer, verifier_for=exclusive_class_verifiers(prompts),
                                      max_pairs_per_prompt=args.max_pairs_per_prompt, **common)  # fmt: skip
    if not processes.is_main:
        return 0
    for skipped in [*report.unreadable, *report.too_long]:
        print(f"warning: skipped {skipped}", file=sys.stderr)
    write_jsonl(args.output, rows)
    shutil.rmtree(progress)
    print(f"{args.output}: {report} from {len(prompts)} questions")
    if args.mode == "perturb" and args.curriculum_dir:
        stages = write_curriculum(rows, args.curriculum_dir, easy_first=not args.hard_first)
        print("curriculum (train with recipes/dpo.py --round_train_files ...):", " ".join(str(p) for p in stages))
    return 0


if __name__ == "__main__":
    sys.exit(main())
