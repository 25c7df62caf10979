"""Write params.yaml from conf/ exactly as `dvc exp run -S ...` composes it.

    python scripts/compose_params.py [OVERRIDE ...]     e.g.  profile=sdxl train.max_train_steps=100

Edit conf/base.yaml or conf/profile/*.yaml, then run this: with Hydra enabled, DVC
recomposes params.yaml from conf/ on every `dvc exp run -S`, so edits made only to
params.yaml would be lost in experiments.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dvc.utils.hydra import compose_and_dump

ROOT = Path(__file__).resolve().parents[1]


def compose(output: Path, overrides: list[str]) -> None:
    compose_and_dump(output, str(ROOT / "conf"), None, "config", "", overrides)


def main() -> None:
    parser = argparse.ArgumentParser(description="compose params.yaml from conf/")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as dvc exp run -S takes them")
    parser.add_argument("--output", type=Path, default=ROOT / "params.yaml")
    args = parser.parse_args()
    compose(args.output, args.overrides)


if __name__ == "__main__":
    main()
