"""How work is shared by the processes a command is launched on (`accelerate launch --num_processes N ...`).

Generation is the costly part of evaluation and self-training, and one answer never depends on another, so it is split
by batch: batch `b` goes to process `b mod N`, and every process gets all results back, in batch order. Where answers
are sampled, each batch draws from its own seed (`stable_seed`), so N processes draw what one would. Only the main
process writes files, and a decision that reads them (is this step finished, is this evaluation saved) is taken there
and sent to the others, so the processes never disagree about what is left to do.

Accelerate has the collectives, but no notion of "the main process decides and the others follow, errors included",
which a resumable run needs at each step: that is what `Processes` adds.
"""

from __future__ import annotations

import json
import pickle
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import torch

if TYPE_CHECKING:
    from transformers import TrainingArguments

T = TypeVar("T")
B = TypeVar("B")


def stable_seed(*parts: Any) -> int:
    """A seed from any values, equal in every process and every run (Python's `hash` of a string is not)."""
    return zlib.crc32(json.dumps(parts, sort_keys=True, default=str).encode())


def cut_into_batches(items: Sequence[T], size: int) -> list[Sequence[T]]:
    """`items` in consecutive batches of `size` (the last may be shorter): the unit a process answers and a run
    resumes by."""
    return [items[start : start + size] for start in range(0, len(items), size)]


@dataclass(frozen=True)
class Processes:
    """The processes of a command: this one's `index` among `count`, and its index on its machine (`local_index`,
    which picks its GPU); one process (index 0 of 1) by default."""

    index: int = 0
    count: int = 1
    local_index: int = 0

    @classmethod
    def of(cls, training_args: TrainingArguments) -> Processes:
        """The processes the run's Trainer was launched on."""
        return cls(training_args.process_index, training_args.world_size, training_args.local_process_index)

    @classmethod
    def launched(cls) -> Processes:
        """The processes this command was launched on (one, unless started by `accelerate launch` or torchrun)."""
        from accelerate import PartialState

        state = PartialState(cpu=not torch.cuda.is_available())  # without it, CPU processes would not find each other
        return cls(state.process_index, state.num_processes, state.local_process_index)

    @property
    def is_main(self) -> bool:
        """The process that writes the files."""
        return self.index == 0

    def owns(self, number: int) -> bool:
        """Whether item `number` (a batch of questions) falls to this process."""
        return number % self.count == self.index

    def place(self, device: torch.device) -> torch.device:
        """This process's own GPU where `device` names the GPU without an index (several processes share no GPU)."""
        if self.count > 1 and device.type == "cuda" and device.index is None:
            return torch.device("cuda", self.local_index)
        return device

    def map_batches(self, batches: Sequence[B], answer: Callable[[B], list[T]]) -> Iterator[list[T]]:
        """`answer` every batch, batch `b` on process `b mod count`; yields, on every process, the results of each
        round of `count` batches in batch order (one round at a time, so a caller can write them as they come)."""
        for first in range(0, len(batches), self.count):
            mine = first + self.index
            yield self.gather(answer(batches[mine]) if mine < len(batches) else [])

    def gather(self, items: list[T]) -> list[T]:
        """Every process's `items`, concatenated in process order, on every process."""
        if self.count == 1:
            return list(items)
        from accelerate.utils import gather_object

        return gather_object(list(items))

    def from_main(self, compute: Callable[[], T]) -> T:
        """`compute()` run on the main process only, its value given to every process; an exception it raises is
        raised on every process (a process left waiting for a value that never comes would hang the run)."""
        if self.count == 1:
            return compute()
        from accelerate.utils import broadcast_object_list

        outcome: list[Any] = [None]
        if self.is_main:
            try:
                outcome = [(True, compute())]
            except Exception as error:  # sent to the other processes, then raised here too
                outcome = [(False, sendable(error))]
        broadcast_object_list(outcome, from_process=0)
        succeeded, value = outcome[0]
        if not succeeded:
            raise value
        return value

    def on_main(self, write: Callable[[], Any]) -> None:
        """`write()` on the main process; every process returns once it is done, so what it wrote can be read next."""
        self.from_main(write)


def sendable(error: Exception) -> Exception:
    """`error` if it survives the pickling that carries it to the other processes, else a RuntimeError with its text
    (an exception whose constructor takes other arguments than it stores fails to unpickle there, and those
    processes would then wait forever)."""
    try:
        pickle.dumps(error)
        type(error)(*error.args)  # what unpickling an exception does on the other side
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")
    return error
