"""DVCLive logging: loss curves and sample images that ``dvc plots show`` renders.

Only the main process logs. A resumed run first drops what the interrupted run logged
after its last checkpoint, then continues the same curves from that step.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

from dvclive import Live
from PIL import Image

_IMAGE_STEP = re.compile(r"^(\d+)\.png$")


class TrainLog:
    def __init__(self, folder: Path, resume_step: int | None, enabled: bool):
        self.live: Live | None = None
        if not enabled:
            return
        if resume_step is not None:
            forget_after(Path(folder), resume_step)
        self.live = Live(str(folder), resume=resume_step is not None, save_dvc_exp=False, dvcyaml=False, report=None)

    def metrics(self, step: int, values: dict[str, float]) -> None:
        if self.live is None:
            return
        self.live.step = step
        for name, value in values.items():
            self.live.log_metric(name, value)
        self.live.sync()

    def images(self, step: int, images: dict[str, Image.Image]) -> None:
        """One slider per name: ``<name>/<step>.png``."""
        if self.live is None:
            return
        for name, image in images.items():
            self.live.log_image(f"{name}/{step:07d}.png", image)

    def close(self) -> None:
        if self.live is not None:
            self.live.end()


def forget_after(folder: Path, step: int) -> None:
    """Remove metric rows and images logged after ``step``."""
    for tsv in (folder / "plots" / "metrics").rglob("*.tsv"):
        with tsv.open(newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        if not rows:
            continue
        kept = [r for r in rows if int(r["step"]) <= step]
        with tsv.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t")
            writer.writeheader()
            writer.writerows(kept)
    for image in (folder / "plots" / "images").rglob("*.png"):
        match = _IMAGE_STEP.match(image.name)
        if match and int(match.group(1)) > step:
            image.unlink()
