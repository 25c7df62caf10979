"""Stages launched as several CPU processes, as ``POSTERTUNE_ACCELERATE_CONFIG`` launches them.

The shipped multi-GPU accelerate config with ``num_processes`` set: on a machine without CUDA
the processes are CPU workers on the gloo backend.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import yaml

from postertune.launch import ACCELERATE_CONFIG

PROJECT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env(folder: Path, processes: int) -> dict[str, str]:
    """The environment under which a stage run in ``folder`` relaunches itself as ``processes``
    processes, one thread each."""
    config = yaml.safe_load((PROJECT / "configs/accelerate/multi_gpu.yaml").read_text())
    config.update(num_processes=processes, main_process_port=free_port())
    (folder / "accelerate.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": str(PROJECT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env[ACCELERATE_CONFIG] = "accelerate.yaml"
    return env


def launch(stage: str, folder: Path, processes: int = 2) -> subprocess.CompletedProcess:
    """``python -m stages.<stage>`` in ``folder``, relaunched as ``processes`` processes; it must succeed."""
    env = launch_env(folder, processes)
    proc = subprocess.run(
        [sys.executable, "-m", f"stages.{stage}"], cwd=folder, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def launch_and_kill(stage: str, folder: Path, started: Callable[[], bool], processes: int = 2) -> None:
    """Launch as ``launch`` does, and kill the launcher and every process it started (SIGKILL)
    as soon as ``started()`` holds: the launch must not have finished by then."""
    proc = subprocess.Popen(
        [sys.executable, "-m", f"stages.{stage}"],
        cwd=folder,
        env=launch_env(folder, processes),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while not started() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    assert proc.poll() is None, "the launch finished before it could be killed"
    assert started(), "the launch did not start its work in time"
    launcher = psutil.Process(proc.pid)
    tree = [launcher, *launcher.children(recursive=True)]  # the workers sit in sessions of their own
    for process in tree:
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(tree, timeout=60)
    proc.wait()
