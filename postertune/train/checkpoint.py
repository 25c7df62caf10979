"""Checkpoints that a run resumes from, kept per run identity.

A checkpoint is ``accelerator.save_state`` (U-Net, optimizer, schedule, RNG states and
registered objects such as the EMA) plus ``trainer_state.json`` (step, images seen).
Checkpoints live under ``<root>/<run id>/step-NNNNNNN``, where the run id is a
fingerprint of every param that shapes the weights, the training data and the base
model: a run only ever resumes from a checkpoint of the same recipe, and checkpoints
of other recipes are left alone. Each is written under a temporary name and renamed
when complete; the oldest beyond ``keep`` are deleted.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from postertune.atomic import write_json

STATE_FILE = "trainer_state.json"
RUN_FILE = "run.json"
_STEP_DIR = re.compile(r"^step-(\d{7,})$")


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
        found = self.complete()
        return found[-1] if found else None

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
