"""Running the project's commands as users run them: a subprocess from the repository root, on one process or on two
started by `accelerate launch` on this CPU."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def accelerate_launch(config: str = "launch/cpu_2proc.yaml") -> list[str]:
    """The command prefix that starts what follows on the processes `config` (under launch/) describes, meeting on
    a free port (tests run in parallel: two launches on the default port would join each other's run)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    accelerate = str(Path(sys.executable).parent / "accelerate")
    return [accelerate, "launch", "--config_file", config, "--main_process_port", str(port)]


def two_cpu_processes() -> list[str]:
    """Two data-parallel processes on this CPU, over gloo."""
    return accelerate_launch("launch/cpu_2proc.yaml")


def command_env() -> dict[str, str]:
    """This environment, with one thread per process (two processes on two cores would otherwise fight over them)
    and the modules importable as in the tests (a command may name a test module's function by its dotted path)."""
    importable = os.pathsep.join([str(REPO), str(REPO / "tests")])
    return {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "PYTHONPATH": importable}


def run(command: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """`command` run to its end, its output captured as text."""
    return subprocess.run(command, cwd=REPO, env=command_env(), capture_output=True, text=True, timeout=timeout)
