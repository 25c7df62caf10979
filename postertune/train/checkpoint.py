"""Checkpoints that a run resumes from, kept per run identity.

A checkpoint is ``accelerator.save_state`` (U-Net, optimizer, schedule, RNG states and
registered objects such as the EMA) plus ``trainer_state.json`` (step, images seen). The
models' weights are written and read one tensor at a time (``stream_model_weights``), in
accelerate's own file names and format.
Checkpoints live under ``<root>/<run id>/step-NNNNNNN``, where the run id is a
fingerprint of every param that shapes the weights, the training data and the base
model: a run only ever resumes from a checkpoint of the same recipe, and checkpoints
of other recipes are left alone. Each is written under a temporary name and renamed
when complete; the oldest beyond ``keep`` are deleted. Before resuming, the newest is
checked (every file's header and length, the state JSON); a damaged one is skipped with a
warning naming it, and the run resumes from the one before.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors import safe_open

from postertune.atomic import write_json
from postertune.errors import PipelineError
from postertune.models.safetensors_writer import pending, write_safetensors

STATE_FILE = "trainer_state.json"
RUN_FILE = "run.json"
_STEP_DIR = re.compile(r"^step-(\d{7,})$")
log = logging.getLogger(__name__)


class Checkpoints:
    def __init__(self, root: Path, run_id: str, keep: int):
        self.folder = Path(root) / run_id[:16]
        self.run_id, self.keep = run_id, keep

    def complete(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        found = [p for p in self.folder.iterdir() if _STEP_DIR.match(p.name) and (p / STATE_FILE).is_file()]
        return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))

    def latest(self) -> Path | None:
        """The newest checkpoint that is whole; damaged newer ones are skipped with a warning."""
        for path in reversed(self.complete()):
            problem = damage(path)
            if problem is None:
                return path
            log.warning("checkpoint %s is damaged (%s): resuming from the one before", path, problem)
        return None

    def save(self, accelerator: Accelerator, state: dict[str, Any], identity: dict[str, Any]) -> Path:
        """Every process calls this; the main process writes the metadata, renames and prunes."""
        final = self.folder / f"step-{state['step']:07d}"
        partial = self.folder / f".{final.name}.partial"
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
            write_json(self.folder / RUN_FILE, {"run_id": self.run_id, **identity})
        accelerator.wait_for_everyone()
        accelerator.save_state(str(partial))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_json(partial / STATE_FILE, state)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
            for old in self.complete()[: -self.keep]:
                shutil.rmtree(old)
        accelerator.wait_for_everyone()
        return final

    def load(self, accelerator: Accelerator, path: Path) -> dict[str, Any]:
        accelerator.load_state(str(path))
        return json.loads((path / STATE_FILE).read_text())


def stream_model_weights(accelerator: Accelerator) -> None:
    """Make ``save_state`` and ``load_state`` write and read the prepared models one tensor at a
    time: accelerate serialises a whole state dict before writing it and loads a whole one before
    copying it in, a second full copy of the U-Net each way (10 GB in float32 at SDXL size).
    FSDP and DeepSpeed save their shards their own way and keep it."""
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return

    def save(models: list, weights: list[dict], output_dir: str) -> None:
        if accelerator.is_main_process:
            for i, state in enumerate(weights):
                tensors = {key: pending(tensor) for key, tensor in state.items()}
                write_safetensors(Path(output_dir) / model_file(i), tensors, {"format": "pt"})
        weights.clear()  # written: accelerate writes none of them again

    def load(models: list, input_dir: str) -> None:
        for i, model in enumerate(models):
            read_into(model, Path(input_dir) / model_file(i))
        models.clear()  # read: accelerate reads none of them again

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


def model_file(index: int) -> str:
    """The name accelerate gives the weights of its ``index``-th prepared model."""
    return "model.safetensors" if index == 0 else f"model_{index}.safetensors"


@torch.no_grad()
def read_into(model: torch.nn.Module, path: Path) -> None:
    """Copy the weights in ``path`` into ``model`` in place, one tensor at a time."""
    state = model.state_dict()
    with safe_open(path, "pt") as weights:
        names = set(weights.keys())
        if names != set(state):
            odd = sorted(names ^ set(state))
            raise PipelineError(f"{path}: the checkpoint's weights do not fit the model (e.g. {odd[0]})")
        for name in names:
            state[name].copy_(weights.get_tensor(name))


def damage(path: Path) -> str | None:
    """What is wrong with a checkpoint folder, or None: a truncated or unreadable file shows in
    its header (safetensors) or its central directory (torch's zip format), read without loading."""
    try:
        json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError) as exc:
        return f"{STATE_FILE}: {exc}"
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        try:
            if file.suffix == ".safetensors":
                with safe_open(file, "pt"):
                    pass
            elif file.suffix in (".bin", ".pt", ".pth", ".pkl"):
                with zipfile.ZipFile(file) as archive:
                    archive.infolist()
        except Exception as exc:  # whatever a damaged file raises, the file is named
            return f"{file.relative_to(path)}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    return None
