"""Check, fingerprint and load the models under comparison."""

from __future__ import annotations

import hashlib
from pathlib import Path

from diffusers import StableDiffusionXLPipeline

from postertune.models.loading import load_pipeline, load_unet, pipeline_from_source
from postertune.models.precision import Precision, torch_dtype
from postertune.models.sources import ModelSource, validate_model_source
from postertune.params import ParamError
from postertune.sample.params import SampledModel
from postertune.train.fingerprint import fingerprint_json

WEIGHT_SUFFIXES = {".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".onnx"}


def check_models(models: list[SampledModel]) -> None:
    """Every source a model names can be loaded from, before anything loads."""
    for i, model in enumerate(models):
        where = f"sample.models[{i}]"
        validate_model_source(f"{where}.base", model.base)
        if model.single_file_config is not None:
            if not Path(model.base).is_file():
                raise ParamError(
                    f"{where}.single_file_config", f"only for a single-file base, and {model.base} is not a file"
                )
            validate_model_source(f"{where}.single_file_config", model.single_file_config)
        if model.unet is not None and not (model.unet / "config.json").is_file():
            what = "is not a diffusers U-Net folder (no config.json)" if model.unet.is_dir() else "does not exist"
            raise ParamError(f"{where}.unet", f"{model.unet} {what}")


def _files(path: Path, weights: bool) -> list[Path]:
    if path.is_file():
        return [path]
    files = [
        p
        for p in path.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
    ]
    if not weights:
        files = [p for p in files if p.suffix not in WEIGHT_SUFFIXES]
    return sorted(files, key=lambda p: p.relative_to(path).as_posix())


def content_hash(path: Path, weights: bool = True) -> str:
    """sha256 over the relative names and bytes of every file (a file: its bytes)."""
    digest = hashlib.sha256()
    for file in _files(path, weights):
        name = file.name if path.is_file() else file.relative_to(path).as_posix()
        with file.open("rb") as f:
            digest.update(f"{name}\0{hashlib.file_digest(f, 'sha256').hexdigest()}\n".encode())
    return digest.hexdigest()


def fingerprints(models: list[SampledModel]) -> dict[str, str]:
    """Per model, a hash of the weights it renders with: same fingerprint, same images.

    Local sources count by content (each hashed once, however many models share it);
    ``tiny`` and hub ids by name (pin a hub model's exact revision by pointing at a local copy).
    """
    hashed: dict[tuple[str, bool], str] = {}

    def source_hash(value: str | Path, weights: bool = True) -> str:
        path = Path(value).expanduser()
        if not path.exists():
            return f"name:{value}"
        key = (str(path.resolve()), weights)
        if key not in hashed:
            hashed[key] = content_hash(path, weights)
        return hashed[key]

    result = {}
    for model in models:
        parts = {"base": source_hash(model.base)}
        if model.unet is not None:
            parts["unet"] = source_hash(model.unet)
        if model.single_file_config is not None:
            parts["single_file_config"] = source_hash(model.single_file_config, weights=False)
        result[model.name] = fingerprint_json(parts)
    return result


def load_model(model: SampledModel, precision: Precision, device: str) -> StableDiffusionXLPipeline:
    dtype = torch_dtype(precision)
    if model.single_file_config is None:
        pipe = load_pipeline(model.base, model.unet, dtype)
    else:
        unet = load_unet(model.unet, dtype) if model.unet is not None else None
        source = ModelSource(base=model.base, single_file_config=model.single_file_config)
        pipe = pipeline_from_source(source, dtype=dtype, unet=unet)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
