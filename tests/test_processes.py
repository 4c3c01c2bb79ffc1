"""Sharing work across processes: who answers which batch, which GPU a process takes, what reaches the others.

The collectives themselves run in the 2-process tests of the evaluator, batch generation and the self-training recipes.
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from videollm.infer.processes import Processes, cut_into_batches, sendable, stable_seed


def test_items_are_cut_into_consecutive_batches():
    assert cut_into_batches(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert cut_into_batches([], 3) == []


def test_every_batch_falls_to_exactly_one_process_in_turn():
    processes = [Processes(index, 3) for index in range(3)]
    owners = [[p.index for p in processes if p.owns(number)] for number in range(7)]
    assert owners == [[0], [1], [2], [0], [1], [2], [0]]
    assert all(Processes().owns(number) for number in range(7))


def test_one_process_computes_and_gathers_locally():
    processes = Processes()
    assert processes.is_main and processes.from_main(lambda: {"done": 3}) == {"done": 3}
    items = [1, 2]
    gathered = processes.gather(items)
    assert gathered == [1, 2] and gathered is not items


def test_each_process_takes_its_own_gpu_unless_one_is_named():
    second = Processes(index=3, count=4, local_index=1)
    assert second.place(torch.device("cuda")) == torch.device("cuda", 1)
    assert second.place(torch.device("cuda", 0)) == torch.device("cuda", 0)  # asked for by index: kept
    assert second.place(torch.device("cpu")) == torch.device("cpu")
    assert Processes().place(torch.device("cuda")) == torch.device("cuda")


class NeedsTwoArguments(Exception):
    def __init__(self, path: str, line: int):
        super().__init__(f"{path}:{line}: bad")


def test_an_error_that_cannot_travel_is_sent_as_its_text():
    plain = ValueError("output_dir holds another run")
    assert sendable(plain) is plain
    unpicklable = sendable(NeedsTwoArguments("data.jsonl", 3))
    assert type(unpicklable) is RuntimeError and str(unpicklable) == "NeedsTwoArguments: data.jsonl:3: bad"


def test_seeds_are_equal_in_processes_with_other_string_hashes():
    salt = "2" if os.environ.get("PYTHONHASHSEED") == "1" else "1"  # a string hash unlike this process's
    code = "from videollm.infer.processes import stable_seed; print(stable_seed(0, 'cycle', 'answer', 3))"
    other = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": salt},
                           capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    assert other == str(stable_seed(0, "cycle", "answer", 3))
    assert stable_seed(0, "cycle", "answer", 3) != stable_seed(0, "cycle", "answer", 4)


def test_one_process_answers_every_batch_and_yields_them_one_round_at_a_time():
    answered = []

    def answer(batch: list[int]) -> list[int]:
        answered.append(batch)
        return [10 * item for item in batch]

    rounds = Processes().map_batches([[1, 2], [3], [4, 5]], answer)
    assert next(rounds) == [10, 20] and answered == [[1, 2]]  # nothing is answered ahead of what is consumed
    assert list(rounds) == [[30], [40, 50]]
