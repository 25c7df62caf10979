"""Check, fingerprint and load the models under comparison."""

from __future__ import annotations

from pathlib import Path

from diffusers import StableDiffusionXLPipeline

from postertune.fingerprint import fingerprint_files, fingerprint_json
from postertune.models.loading import load_pipeline, load_unet, pipeline_from_source
from postertune.models.lora import check_loras, merge_loras
from postertune.models.precision import Precision, torch_dtype
from postertune.models.schedule import unet_schedule, use_unet_schedule
from postertune.models.sources import ModelSource, validate_model_source
from postertune.models.text_encoders import load_text_encoders, saved_text_encoders
from postertune.params import ParamError
from postertune.sample.params import SampledModel, SchedulerName
from postertune.sample.schedulers import check_sampler


def check_models(models: list[SampledModel], scheduler: SchedulerName) -> None:
    """Every source a model names can be loaded from, and sampled with ``scheduler``, before anything loads."""
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
        if model.unet is not None and (schedule := unet_schedule(model.unet)) is not None:
            check_sampler(scheduler, schedule, model.name)
        if model.text_encoders is not None and not model.text_encoders.is_dir():
            raise ParamError(f"{where}.text_encoders", f"{model.text_encoders} is not a folder")
        for j, lora in enumerate(model.loras):
            if not lora.path.is_file():
                raise ParamError(f"{where}.loras[{j}].path", f"{lora.path} does not exist")


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
            hashed[key] = fingerprint_files(path, weights)
        return hashed[key]

    result = {}
    for model in models:
        parts = {"base": source_hash(model.base)}
        if model.unet is not None:
            parts["unet"] = source_hash(model.unet)
        if model.text_encoders is not None and saved_text_encoders(model.text_encoders):
            parts["text_encoders"] = source_hash(model.text_encoders)
        if model.single_file_config is not None:
            parts["single_file_config"] = source_hash(model.single_file_config, weights=False)
        if model.loras:
            parts["loras"] = [[source_hash(lora.path), lora.weight] for lora in model.loras]
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
        if model.unet is not None:
            use_unet_schedule(pipe, model.unet)
    if model.text_encoders is not None:
        load_text_encoders(pipe, model.text_encoders, dtype)
    if model.loras:
        merge_loras(pipe.unet, check_loras([(lora.path, lora.weight) for lora in model.loras], pipe.unet))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
