"""How a self-training run is shared by the processes it is launched on (`accelerate launch --num_processes N`).

Every process runs the same loop over cycles (or rounds). Generation, the costly part, is split by batch: batch `b`
of a round of `N` batches is answered by process `b mod N`, from the batch's own seed, so the answers are the ones a
single process would draw. Training is data-parallel through the Trainer (DDP, DeepSpeed or FSDP, as launched).
Only the main process writes run files, and every decision that reads them (is this cycle finished, is this
evaluation saved) is taken there and sent to the others, so the processes never disagree about what is left to do.

Accelerate has the collectives, but no notion of "the main process decides and the others follow, errors included",
which a resumable run needs at each step: that is what `Processes` adds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from transformers import TrainingArguments

T = TypeVar("T")


@dataclass(frozen=True)
class Processes:
    """The processes of a run: this one's `index` among `count`; one process (index 0 of 1) by default."""

    index: int = 0
    count: int = 1

    @classmethod
    def of(cls, training_args: TrainingArguments) -> Processes:
        """The processes the run's Trainer was launched on."""
        return cls(index=training_args.process_index, count=training_args.world_size)

    @property
    def is_main(self) -> bool:
        """The process that writes the run's files."""
        return self.index == 0

    def owns(self, number: int) -> bool:
        """Whether item `number` (a batch of questions) falls to this process."""
        return number % self.count == self.index

    def wait(self) -> None:
        """Return when every process got here (e.g. once the main process wrote what the others read next)."""
        if self.count > 1:
            from accelerate import PartialState

            PartialState().wait_for_everyone()

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
                outcome = [(False, error)]
        broadcast_object_list(outcome, from_process=0)
        succeeded, value = outcome[0]
        if not succeeded:
            raise value
        return value

    def on_main(self, write: Callable[[], Any]) -> None:
        """`write()` on the main process; every process returns once it is done, so what it wrote can be read next."""
        self.from_main(write)
