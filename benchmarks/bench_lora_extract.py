"""LoRA extraction at full SDXL size: time and peak memory per rank, on the CPU.

    python benchmarks/bench_lora_extract.py --ranks 64 256             # randomized SVD (the sdxl profile's)
    python benchmarks/bench_lora_extract.py --ranks 64 --svd full      # LAPACK's exact SVD

Writes a base and a "fine-tuned" U-Net at the real SDXL 1.0 config (2,567,463,684
parameters, random weights, nothing downloaded) as sharded fp16 diffusers folders under
``--workdir`` (about 5 GB each, reused by later runs), generated one tensor at a time: the
fine-tune is the base plus dense noise of 1/100 of each weight's scale. Then each rank runs in
its own process, the way the lora stage runs (layers read one at a time from both folders, one
file written): wall time, CPU time, peak resident memory (``ru_maxrss``, which counts the
memory-mapped weight files too) and peak anonymous memory (sampled ``RssAnon``), file size and the
relative Frobenius error of the delta, as a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from postertune.models.sdxl_configs import SDXL_UNET  # noqa: E402

SDXL_PARAMETERS = 2_567_463_684
SHARD_BYTES = 2 * 1024**3


def write_unets(workdir: Path, seed: int = 0) -> tuple[Path, Path]:
    """Base and fine-tune folders (fp16 shards + index + config), one tensor in memory at a time."""
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    from postertune.models.loading import UNET_WEIGHTS

    base, tuned = workdir / "base" / "unet", workdir / "finetuned"
    if (base / "done").is_file() and (tuned / "done").is_file():
        return base.parent, tuned
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET)
    count = sum(p.numel() for p in unet.parameters())
    assert count == SDXL_PARAMETERS, count
    shapes = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    for folder in (base, tuned):
        folder.mkdir(parents=True, exist_ok=True)
        unet.save_config(folder)
    shard: dict[str, dict] = {"base": {}, "tuned": {}}
    size, index, maps = 0, 0, {"base": {}, "tuned": {}}

    def flush() -> None:
        nonlocal size, index
        name = f"{UNET_WEIGHTS.removesuffix('.safetensors')}-{index:05d}.safetensors"
        for which, folder in (("base", base), ("tuned", tuned)):
            save_file(shard[which], folder / name, metadata={"format": "pt"})
            maps[which].update(dict.fromkeys(shard[which], name))
            shard[which] = {}
        size, index = 0, index + 1

    for key, shape in shapes.items():
        fan_in = max(1, int(torch.tensor(shape[1:]).prod())) if len(shape) > 1 else 1
        weight = torch.randn(shape, generator=gen) / fan_in**0.5
        noise = torch.randn(shape, generator=gen) * float(weight.std()) / 100
        shard["base"][key] = weight.half()
        shard["tuned"][key] = (weight + noise).half()
        size += weight.numel() * 2
        if size >= SHARD_BYTES:
            flush()
    if shard["base"]:
        flush()
    for which, folder in (("base", base), ("tuned", tuned)):
        index_data = {"metadata": {"total_size": count * 2}, "weight_map": maps[which]}
        (folder / f"{UNET_WEIGHTS}.index.json").write_text(json.dumps(index_data))
        (folder / "done").write_text("")
    return base.parent, tuned


class AnonPeak:
    """Peak anonymous resident memory (``RssAnon``), sampled: ``ru_maxrss`` also counts the pages of
    the memory-mapped safetensors files, which are page cache that the kernel can drop."""

    def __init__(self, every_s: float = 0.1):
        import threading

        self.peak_kb, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._watch, args=(every_s,), daemon=True)
        self._thread.start()

    def _watch(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    self.peak_kb = max(self.peak_kb, int(line.split()[1]))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return round(self.peak_kb / 1024**2, 2)


def run_one(base: Path, tuned: Path, rank: int, svd: str, out: Path) -> dict:
    """One extraction as the stage runs it; this process's numbers."""
    from postertune.lora.extract import extract, lora_metadata, lora_tensors, save_lora
    from postertune.models.weights import open_unet_weights

    anon = AnonPeak()
    started, cpu = time.monotonic(), time.process_time()
    b, t = open_unet_weights(base), open_unet_weights(tuned)
    extraction = extract(b, t, [rank], rank, 0.0, "cpu", svd)
    save_lora(out, lora_tensors(extraction, rank, "fp16"), lora_metadata(extraction, rank, str(base), str(tuned)))
    return dict(
        rank=rank,
        svd=svd,
        wall_s=round(time.monotonic() - started, 1),
        cpu_s=round(time.process_time() - cpu, 1),
        peak_rss_gb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 2),
        peak_anon_gb=anon.stop(),
        file_mb=round(out.stat().st_size / 1e6, 1),
        layers=len(extraction.layers),
        relative_error=round(extraction.relative_error(rank), 4),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--svd", choices=["full", "randomized"], default="randomized")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/postertune-bench-lora"))
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: one rank in this process
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    if args.one is not None:
        base, tuned = args.workdir / "base", args.workdir / "finetuned"
        result = run_one(base, tuned, args.one, args.svd, args.workdir / f"rank-{args.one}.safetensors")
        print(json.dumps(result))
        return
    started = time.monotonic()
    write_unets(args.workdir)
    print(f"U-Net pair written in {time.monotonic() - started:.0f} s under {args.workdir}", file=sys.stderr)
    rows = []
    for rank in args.ranks:
        cmd = [sys.executable, __file__, "--one", str(rank), "--svd", args.svd, "--workdir", str(args.workdir)]
        cmd += ["--threads", str(args.threads)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), file=sys.stderr)
    header = list(rows[0])
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(row[h]) for h in header) + " |")


if __name__ == "__main__":
    main()
