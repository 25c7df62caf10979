"""A stage past one process: relaunched under ``accelerate launch``, its work shared out.

With ``POSTERTUNE_ACCELERATE_CONFIG`` naming an accelerate config, the stages that scale
(caption, curate, train, sample, evaluate) replace themselves, once their params are known
good, by ``accelerate launch --config_file <config> -m stages.<name>``, which is how
``dvc repro`` and ``dvc exp run`` reach several GPUs. Without it a stage runs in this one
process, as it always has.

The inference stages share their work the same way: every process lists the same work items
(from the same files, read before any process writes), takes one contiguous block of them
(``Processes.share``), and saves each finished item as it goes, so a killed run keeps them;
the main process merges once every process is done (``Processes.wait``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

from postertune.errors import PipelineError

ACCELERATE_CONFIG = "POSTERTUNE_ACCELERATE_CONFIG"
# The last wait lasts as long as the slowest share outruns the fastest; on a run of hours that
# can pass torch's defaults (30 min on gloo, 10 on NCCL). A process that dies ends the launch.
WAIT_TIMEOUT = timedelta(hours=24)

P = TypeVar("P")
R = TypeVar("R")
T = TypeVar("T")


def relaunch(stage: str) -> None:
    """Under ``POSTERTUNE_ACCELERATE_CONFIG``, replace this process by ``accelerate launch`` of
    ``stages.<stage>``; otherwise return at once."""
    config = os.environ.pop(ACCELERATE_CONFIG, None)  # the launched processes must not launch again
    if not config:
        return
    if not Path(config).is_file():
        raise PipelineError(f"{ACCELERATE_CONFIG}={config}: no such accelerate config file")
    launch = ["-m", "accelerate.commands.launch", "--config_file", config, "-m", f"stages.{stage}"]
    os.execv(sys.executable, [sys.executable, *launch])


def relaunched(stage: str, run: Callable[[P], R]) -> Callable[[P], R]:
    """``run``, preceded by ``relaunch(stage)``: what a stage module hands ``run_stage``.
    A launched process leaves the process group once ``run`` is done."""

    def relaunch_or_run(params: P) -> R:
        relaunch(stage)
        result = run(params)
        if "torch" in sys.modules:  # a process group needs torch; a stage that never loaded it has none
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()
        return result

    return relaunch_or_run


@dataclass(frozen=True)
class Processes:
    """This process's place among those one launch started: ``index`` of ``count``
    (``local_index`` on its machine, which picks its GPU)."""

    index: int = 0
    count: int = 1
    local_index: int = 0

    @property
    def main(self) -> bool:
        return self.index == 0

    @property
    def suffix(self) -> str:
        """Marks the cache parts this process writes beside the others' ("" for one process)."""
        return f"-r{self.index}" if self.count > 1 else ""

    def wait(self) -> None:
        """Return once every process has called this (at once for one process)."""
        if self.count > 1:
            from accelerate import PartialState

            PartialState().wait_for_everyone()

    def share(self, items: Sequence[T]) -> list[T]:
        """This process's ``block`` of ``items``. It waits first, so that no process lists its
        items after another began writing."""
        self.wait()
        return block(items, self.index, self.count)


def block(items: Sequence[T], index: int, count: int) -> list[T]:
    """Block ``index`` of ``count`` contiguous blocks of ``items``, their sizes differing by one at most."""
    size, extra = divmod(len(items), count)
    start = index * size + min(index, extra)
    return list(items[start : start + size + (index < extra)])


ONE_PROCESS = Processes()


def launched_processes() -> Processes:
    """This process's place; joins the launch's process group (and takes this process's GPU
    as the current one) when several processes were launched."""
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return ONE_PROCESS
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available(), timeout=WAIT_TIMEOUT)
    return Processes(state.process_index, state.num_processes, state.local_process_index)
