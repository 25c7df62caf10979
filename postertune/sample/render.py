"""Plan every (model, prompt, seed) image, render only those not already on disk.

An image is identified by a key over the model's content hash, the prompt, the negative
prompt, the seed and the render settings. A rerun keeps every image whose key and bytes
still match the manifest and renders the rest; the manifest is rewritten (atomically)
after every image, so a killed run loses at most the image in flight. Launched processes
each render a contiguous block of the missing images, recording every one in a part of
the manifest; the main process folds the parts in at the end.
"""

from __future__ import annotations

import hashlib
import io
import time
from dataclasses import dataclass
from pathlib import Path

from diffusers import StableDiffusionXLPipeline
from PIL import Image, PngImagePlugin
from tqdm import tqdm

from postertune.atomic import write_bytes
from postertune.fingerprint import short_fingerprint
from postertune.imagesafe import load_image
from postertune.launch import ONE_PROCESS, Processes
from postertune.models.prompts import chunks_needed
from postertune.models.render import render
from postertune.models.tokenizer import clip_tokenizer
from postertune.sample.grid import make_grid
from postertune.sample.manifest import file_sha256, read_manifest, read_parts, remove_parts, write_manifest, write_part
from postertune.sample.models import load_model
from postertune.sample.params import SampledModel, SampleParams
from postertune.sample.prompts import Prompt, combine_negative
from postertune.sample.schedulers import make_scheduler

IMAGES_DIR = "images"
GRIDS_DIR = "grids"


@dataclass(frozen=True)
class Job:
    model: str
    model_hash: str
    prompt: Prompt
    negative_prompt: str
    seed: int
    settings_hash: str

    @property
    def key(self) -> str:
        return short_fingerprint(
            [self.model_hash, self.prompt.prompt, self.negative_prompt, self.seed, self.settings_hash]
        )

    @property
    def path(self) -> str:
        return f"{IMAGES_DIR}/{self.model}/{self.prompt.id}/seed-{self.seed}.png"

    def row(self, sha256: str) -> dict[str, str]:
        return dict(
            model=self.model,
            prompt_id=self.prompt.id,
            category=self.prompt.category,
            prompt=self.prompt.prompt,
            negative_prompt=self.negative_prompt,
            seed=str(self.seed),
            path=self.path,
            settings_hash=self.settings_hash,
            model_hash=self.model_hash,
            key=self.key,
            sha256=sha256,
        )


@dataclass(frozen=True)
class RenderResult:
    rendered: int
    reused: int
    seconds: float  # wall time of loading models and rendering


def plan_jobs(
    params: SampleParams, model_hashes: dict[str, str], prompts: list[Prompt], presets: dict[str, str]
) -> list[Job]:
    """Every model gets the same (prompt, seed) pairs."""
    settings_hash = short_fingerprint(params.settings)
    jobs = []
    for model in params.models:
        for prompt in prompts:
            negative = combine_negative(prompt.negative_presets or params.negative, presets, params.negative_text)
            for seed in params.seeds:
                jobs.append(Job(model.name, model_hashes[model.name], prompt, negative, seed, settings_hash))
    return jobs


def truncation_warnings(jobs: list[Job], max_token_length: int) -> list[str]:
    """Texts longer than the encoders see, ``max_token_length`` tokens in 75-token chunks
    (combined negative presets often are)."""
    tokenizer = clip_tokenizer()
    texts = {}
    for job in jobs:
        texts.setdefault(("prompt", job.prompt.id), job.prompt.prompt)
        texts.setdefault(("negative prompt", job.prompt.id), job.negative_prompt)
    warnings = []
    for (kind, prompt_id), text in texts.items():
        count = len(tokenizer(text, add_special_tokens=False, verbose=False).input_ids)
        if count > max_token_length:
            warnings.append(f"{kind} of {prompt_id} is {count} tokens; only the first {max_token_length} count")
    return warnings


def multi_chunk_prompts(jobs: list[Job]) -> int:
    """Distinct prompts and negative prompts longer than one 75-token chunk."""
    tokenizer = clip_tokenizer()
    texts = {text for job in jobs for text in (job.prompt.prompt, job.negative_prompt)}
    return sum(chunks_needed(tokenizer, text) > 1 for text in texts)


def _png(image: Image.Image, job: Job) -> bytes:
    info = PngImagePlugin.PngInfo()
    for key, value in job.row("").items():
        if key != "sha256":
            info.add_text(key, value)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def model_pipeline(model: SampledModel, params: SampleParams) -> StableDiffusionXLPipeline:
    """``model`` loaded to render with the named sampler on its own noise schedule."""
    pipe = load_model(model, params.precision, params.torch_device)
    pipe.scheduler = make_scheduler(params.scheduler, pipe.scheduler.config, model.name)
    return pipe


def render_one(pipe: StableDiffusionXLPipeline, job: Job, params: SampleParams) -> Image.Image:
    return render(
        pipe,
        job.prompt.prompt,
        job.negative_prompt,
        job.seed,
        params.steps,
        params.guidance_scale,
        params.width,
        params.height,
        params.max_token_length,
        guidance_rescale=params.guidance_rescale,
    )


def render_jobs(jobs: list[Job], params: SampleParams, processes: Processes = ONE_PROCESS) -> RenderResult | None:
    """Render the jobs not already on disk. Launched as several processes, each renders its
    share and records it in parts; the main process merges them (the others return None)."""
    output = params.output
    earlier = read_manifest(output) | read_parts(output)
    done: dict[str, dict[str, str]] = {}
    missing: list[Job] = []
    for job in jobs:
        row = earlier.get(job.path)
        if row and row["key"] == job.key and file_sha256(output / job.path) == row["sha256"]:
            done[job.path] = row
        else:
            missing.append(job)
    order = [job.path for job in jobs]

    def save_manifest() -> None:
        write_manifest(output, [done[p] for p in order if p in done])

    def record(path: str) -> None:
        if processes.count == 1:
            save_manifest()
        else:
            write_part(output, done[path])

    todo = processes.share(missing)  # contiguous: each process loads as few models as it can
    if processes.count == 1:
        save_manifest()
    sources = {m.name: m for m in params.models}
    started = time.monotonic()
    with tqdm(total=len(todo), desc="sample", unit="image") as bar:
        for name in dict.fromkeys(job.model for job in todo):
            pipe = model_pipeline(sources[name], params)
            for job in (j for j in todo if j.model == name):
                data = _png(render_one(pipe, job, params), job)
                write_bytes(output / job.path, data)
                done[job.path] = job.row(hashlib.sha256(data).hexdigest())
                record(job.path)
                bar.update()
            del pipe  # free this model before the next one loads
    processes.wait()
    if not processes.main:
        return None
    if processes.count > 1:
        parts = read_parts(output)
        done.update((job.path, parts[job.path]) for job in missing)
        save_manifest()
    remove_parts(output)
    prune(output, {job.path for job in jobs})
    return RenderResult(rendered=len(missing), reused=len(jobs) - len(missing), seconds=time.monotonic() - started)


def prune(output: Path, keep: set[str]) -> None:
    """Delete images no longer planned (a prompt or model removed), and emptied folders."""
    root = output / IMAGES_DIR
    if not root.is_dir():
        return
    for file in root.rglob("*"):
        if file.is_file() and file.relative_to(output).as_posix() not in keep:
            file.unlink()
    for folder in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        if not any(folder.iterdir()):
            folder.rmdir()


def write_grids(jobs: list[Job], params: SampleParams) -> list[Path]:
    """A grid per prompt, models side by side; grids of prompts no longer planned go."""
    grids = params.output / GRIDS_DIR
    models = list(dict.fromkeys(job.model for job in jobs))
    paths = {(job.prompt.id, job.seed, job.model): params.output / job.path for job in jobs}
    written = []
    for prompt in dict.fromkeys(job.prompt for job in jobs):
        cells = [[load_image(paths[prompt.id, seed, m].read_bytes()) for m in models] for seed in params.seeds]
        title = f"{prompt.id}: {prompt.prompt}"
        sheet = make_grid(cells, models, [f"seed {s}" for s in params.seeds], title, params.grid_cell_width)
        buffer = io.BytesIO()
        sheet.save(buffer, format="PNG")
        path = grids / f"{prompt.id}.png"
        write_bytes(path, buffer.getvalue())
        written.append(path)
    for stale in set(grids.glob("*.png")) - set(written):
        stale.unlink()
    return written
