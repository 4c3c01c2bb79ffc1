"""Crash-safe training checkpoints: staged, fsynced, renamed into place, then pointed at; old ones rotated last.

transformers' Trainer writes `checkpoint-N` in place and rotates old checkpoints by mtime, so a kill during a save
leaves a partial `checkpoint-N` that `resume_from_checkpoint=True` (the highest N) then tries to load. Here a
checkpoint is written to `.staging-checkpoint-N`, every file and directory is fsynced, the directory is renamed to
`checkpoint-N` (atomic on POSIX), and only then does the `latest_checkpoint` pointer file change, again by an atomic
rename. Rotation (`save_total_limit`) runs after the pointer moved, renaming a victim out of the `checkpoint-N`
namespace before deleting it, so a kill at any moment leaves every `checkpoint-N` complete. Saving a step that already
has a checkpoint (a run resumed from an older one) first renames the old one to `.superseded-checkpoint-N` and deletes
it only after the new one is in place: a kill between the two renames leaves the superseded copy, which resolution
counts as step N and `clean_incomplete` renames back.

What goes into a checkpoint (weights in the videollm layout, optimizer, scheduler, per-rank RNG, trainer state with
the step and the data position) is still the Trainer's own: `CheckpointMixin` only changes where and in which order
it is written, and how `resume_from_checkpoint: true | latest` finds it.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, SaveStrategy

from videollm.model.checkpoint import save_checkpoint

logger = logging.getLogger(__name__)

LATEST_POINTER = "latest_checkpoint"
STAGING_PREFIX = ".staging-"
TRASH_PREFIX = ".trash-"
SUPERSEDED_PREFIX = ".superseded-"
# Written last into a checkpoint (after the weights, optimizer, scheduler and RNG states): a directory that holds it
# was fully written. Checkpoints published by `publish_checkpoint` are complete anyway; the check also protects
# against a partial `checkpoint-N` written by plain transformers before this module was used.
COMPLETE_MARKER = TRAINER_STATE_NAME
RESUME_LATEST = ("true", "latest")
_CHECKPOINT_NAME = re.compile(rf"^(?:{re.escape(SUPERSEDED_PREFIX)})?{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def checkpoint_step(path: str | Path) -> int | None:
    """The step of a `checkpoint-N` (or `.superseded-checkpoint-N`) directory name, None for any other name."""
    match = _CHECKPOINT_NAME.match(Path(path).name)
    return int(match.group(1)) if match else None


def is_complete_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    return checkpoint_step(path) is not None and (path / COMPLETE_MARKER).is_file()


def fsync_tree(path: str | Path) -> None:
    """fsync every file and directory under `path` (and `path` itself), so a rename that follows is durable."""
    for root, _, files in os.walk(path):
        for name in files:
            _fsync(Path(root) / name)
        _fsync(Path(root))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_pointer(run_dir: str | Path, name: str) -> None:
    """Point `run_dir/latest_checkpoint` at the checkpoint directory `name`, atomically and durably."""
    run_dir = Path(run_dir)
    temporary = run_dir / f"{STAGING_PREFIX}{LATEST_POINTER}"
    with open(temporary, "w") as handle:
        handle.write(name + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, run_dir / LATEST_POINTER)
    _fsync(run_dir)


def _discard(path: Path) -> None:
    """Delete a directory without ever leaving it half-deleted under its own name."""
    trash = path.with_name(f"{TRASH_PREFIX}{path.name}")
    if trash.exists():
        shutil.rmtree(trash)
    os.rename(path, trash)
    shutil.rmtree(trash)


def publish_checkpoint(staging: str | Path, final: str | Path) -> None:
    """Make the fully written `staging` directory the checkpoint `final`, then point `latest_checkpoint` at it.

    A `final` left by an earlier attempt at the same step (a run resumed from a checkpoint older than the newest saves
    that step again) is renamed to its superseded name first and deleted only once the new one is published, so a
    complete copy of that step exists at every moment.
    """
    staging, final = Path(staging), Path(final)
    superseded = final.with_name(f"{SUPERSEDED_PREFIX}{final.name}")
    fsync_tree(staging)
    if final.exists():
        if superseded.exists():
            _discard(superseded)
        os.rename(final, superseded)
        _fsync(final.parent)
    os.rename(staging, final)
    _fsync(final.parent)
    write_pointer(final.parent, final.name)
    if superseded.exists():
        _discard(superseded)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of `run_dir`, one per step, oldest step first.

    A step's `checkpoint-N` wins over its superseded copy; the copy counts only while a kill left no `checkpoint-N`.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    by_step: dict[int, Path] = {}
    for path in sorted(run_dir.iterdir(), key=lambda p: p.name.startswith(SUPERSEDED_PREFIX)):
        if path.is_dir() and is_complete_checkpoint(path):
            by_step.setdefault(checkpoint_step(path), path)
    return [by_step[step] for step in sorted(by_step)]


def resolve_latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint `latest_checkpoint` names if it is complete, else the complete one with the highest step.

    Staging and trash directories never count: they do not match `checkpoint-N`. A superseded copy counts for its
    step while no `checkpoint-N` of that step exists (a kill during a replacing save).
    """
    run_dir = Path(run_dir)
    pointer = run_dir / LATEST_POINTER
    if pointer.is_file():
        named = run_dir / pointer.read_text().strip()
        if named.parent == run_dir and is_complete_checkpoint(named):
            return named
        logger.warning("%s names %s, which is not a complete checkpoint; using the newest complete one", pointer, named)
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


def clean_incomplete(run_dir: str | Path) -> list[Path]:
    """Undo what a killed save or rotation left in `run_dir`: a superseded checkpoint whose replacement never got
    its name is renamed back; staging, trash and other superseded directories are deleted and returned."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    for superseded in run_dir.glob(f"{SUPERSEDED_PREFIX}*"):
        final = superseded.with_name(superseded.name.removeprefix(SUPERSEDED_PREFIX))
        if not final.exists() and is_complete_checkpoint(superseded):
            os.rename(superseded, final)
            _fsync(run_dir)
            logger.warning("restored %s: the save that was replacing it was interrupted", final)
    prefixes = (STAGING_PREFIX, TRASH_PREFIX, SUPERSEDED_PREFIX)
    leftovers = [p for p in run_dir.iterdir() if p.name.startswith(prefixes)]
    for path in leftovers:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    return leftovers


def rotate_checkpoints(
    run_dir: str | Path, save_total_limit: int | None, keep: tuple[str | Path | None, ...] = ()
) -> list[Path]:
    """Delete the oldest complete checkpoints beyond `save_total_limit`; return the deleted ones.

    The checkpoint `latest_checkpoint` resolves to and every path in `keep` (e.g. the best model) always stay.
    """
    if save_total_limit is None or save_total_limit <= 0:
        return []
    checkpoints = list_checkpoints(run_dir)
    protected = {Path(p).resolve() for p in keep if p is not None}
    latest = resolve_latest_checkpoint(run_dir)
    if latest is not None:
        protected.add(latest.resolve())
    excess = len(checkpoints) - max(save_total_limit, len(protected))
    deleted = []
    for path in checkpoints:
        if len(deleted) >= excess:
            break
        if path.resolve() not in protected:
            _discard(path)
            deleted.append(path)
    return deleted


def resume_target(resume_from_checkpoint: str | bool | None, run_dir: str | Path) -> str | None:
    """What `resume_from_checkpoint` means: None (start fresh), or the checkpoint directory to load.

    `true` / `latest` (YAML booleans arrive as bool, CLI values as strings) resolve to the latest complete checkpoint
    in `run_dir`; an explicit path must be a complete checkpoint.
    """
    if resume_from_checkpoint in (None, False) or str(resume_from_checkpoint).lower() in ("", "false", "none"):
        return None
    if resume_from_checkpoint is True or str(resume_from_checkpoint).lower() in RESUME_LATEST:
        latest = resolve_latest_checkpoint(run_dir)
        if latest is None:
            raise ValueError(f"resume_from_checkpoint: no complete checkpoint in {run_dir} to resume from")
        return str(latest)
    path = Path(resume_from_checkpoint)
    if not (path / COMPLETE_MARKER).is_file():
        raise ValueError(f"resume_from_checkpoint: {path} is not a complete checkpoint (no {COMPLETE_MARKER})")
    return str(path)


class CheckpointMixin:
    """Trainer mixin: the videollm checkpoint layout, saved by the right rank; atomic `checkpoint-N` saves, a
    `latest_checkpoint` pointer, rotation after publishing, and `resume_from_checkpoint: true | latest` that resolves
    through the pointer and cleans up what a kill left behind.

    Put it before `transformers.Trainer` (or a TRL trainer) in the bases. It replaces `Trainer._save_checkpoint` with
    the same steps in a crash-safe order, so the files of a checkpoint are exactly the Trainer's.
    """

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        # The videollm layout (adapter or full model + projector + config + processor, loadable with `load_model`),
        # which the Trainer's `_load_from_checkpoint` also reads back on resume. Only the rank(s) that own the disk
        # write (`should_save`: world rank 0, or local rank 0 of every node with `save_on_each_node`); others return,
        # unless transformers sharded the model at load time and they must join the gathers of `save_pretrained`.
        if not self.args.should_save and not self.is_distributed_loading_by_transformers:
            return
        output_dir = Path(output_dir or self.args.output_dir)
        if self.args.should_save:
            output_dir.mkdir(parents=True, exist_ok=True)
        save_checkpoint(
            self.model, self.processing_class, output_dir, state_dict=state_dict, is_main_process=self.args.should_save
        )

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None):
        run_dir = Path(self.args.output_dir)
        if self.args.should_save:
            for leftover in clean_incomplete(run_dir):
                logger.warning("removed %s, left by an interrupted checkpoint save", leftover)
        target = resume_target(resume_from_checkpoint, run_dir)
        if target is not None:
            logger.info("resuming from %s", target)
        return super().train(resume_from_checkpoint=target, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval)

    def _save_checkpoint(self, model, trial) -> None:
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        run_dir = Path(self._get_output_dir(trial=trial))
        final, staging = run_dir / name, run_dir / f"{STAGING_PREFIX}{name}"
        if self.args.should_save and staging.exists():
            shutil.rmtree(staging)
        self.accelerator.wait_for_everyone()  # no rank writes into the staging directory before it is empty
        if self.hp_search_backend is None and trial is None:
            self.store_flos()

        self.save_model(str(staging), _internal_call=True)
        if not self.args.save_only_model:
            self._save_optimizer_and_scheduler(str(staging))
            self._save_scaler(str(staging))
            self._save_rng_state(str(staging))
        self._track_best_checkpoint(run_dir, final)
        if self.args.should_save:
            self._save_state_with_callbacks(staging / COMPLETE_MARKER)
        self.accelerator.wait_for_everyone()  # every rank's files (RNG states, sharded optimizer) are in staging

        if self.args.should_save:
            publish_checkpoint(staging, final)
            rotate_checkpoints(run_dir, self.args.save_total_limit, keep=(self.state.best_model_checkpoint,))
        self.accelerator.wait_for_everyone()
        if self.args.push_to_hub:
            self._push_from_checkpoint(str(final))

    def _track_best_checkpoint(self, run_dir: Path, final: Path) -> None:
        """Record the best model's checkpoint by its final name (the Trainer looks for it on disk, where the current
        one is still under its staging name)."""
        best_step = self.state.best_global_step
        saving = self.args.save_strategy in (SaveStrategy.STEPS, SaveStrategy.EPOCH, SaveStrategy.BEST)
        if not saving or not best_step:
            return
        best = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{best_step}"
        if best == final or best.is_dir():
            self.state.best_model_checkpoint = str(best)

    def _save_state_with_callbacks(self, path: Path) -> None:
        """The Trainer's state file, with the current state of every `ExportableState` callback (a list for several
        callbacks of one class), as `Trainer` writes it."""
        states: dict[str, list[dict]] = {}
        for callback in self.callback_handler.callbacks + [self.control]:
            if isinstance(callback, ExportableState):
                states.setdefault(type(callback).__name__, []).append(callback.state())
        self.state.stateful_callbacks.update({name: s[0] if len(s) == 1 else s for name, s in states.items()})
        self.state.save_to_json(str(path))
