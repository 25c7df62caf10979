"""The BLIP captioner: transformers' ``BlipForConditionalGeneration``, batched, on GPU
when there is one. Loads through ``from_pretrained`` from a hub id or a local folder."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from transformers import BlipForConditionalGeneration, BlipProcessor

from postertune.caption.cache import CaptionRecord
from postertune.caption.params import BlipParams
from postertune.devices import resolve_device
from postertune.errors import PipelineError
from postertune.models.precision import torch_dtype
from postertune.params import ParamError


def local_path(model: str) -> Path | None:
    """``model`` as a local path, or None when it reads as a hub id ("org/name").

    A path whose parent folder exists locally (``models/blip``) is local even when
    missing, so a typo fails at once instead of after minutes of hub retries."""
    path = Path(model).expanduser()
    if path.exists() or path.is_absolute() or model.startswith((".", "~")) or len(path.parts) > 2:
        return path
    return path if len(path.parts) == 2 and path.parent.is_dir() else None


class BlipCaptioner:
    name = "blip"

    def __init__(self, params: BlipParams):
        self.params = params
        self.device = resolve_device("caption.blip.device", params.device)
        path = local_path(params.model)
        if path is not None and not (path / "config.json").is_file():
            raise ParamError("caption.blip.model", f"{path} is not a model folder (no config.json there)")
        try:
            self.processor = BlipProcessor.from_pretrained(params.model)
            self.model = BlipForConditionalGeneration.from_pretrained(params.model, dtype=torch_dtype(params.dtype))
        except (OSError, ValueError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise PipelineError(f"param caption.blip.model: cannot load {params.model!r}: {reason}") from None
        self.model.to(self.device).eval()
        self.batch_size = params.batch_size
        size = self.processor.image_processor.size
        self.image_size = max(size.get("height", 0), size.get("width", 0), size.get("shortest_edge", 0)) or 384

    def _generate_kwargs(self) -> dict:
        p = self.params
        kwargs = dict(min_length=p.min_length, max_length=p.max_length)
        if p.decoding == "beam":
            return kwargs | dict(num_beams=p.num_beams, do_sample=False)
        return kwargs | dict(do_sample=True, top_p=p.top_p, num_beams=1)

    @torch.inference_mode()
    def caption(self, shas: list[str], images: list[Image.Image]) -> list[CaptionRecord]:
        prefix = self.params.prefix.strip()
        inputs = self.processor(images=images, text=[prefix] * len(images) if prefix else None, return_tensors="pt")
        inputs = inputs.to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        if self.params.decoding == "nucleus":
            torch.manual_seed(self.params.seed)
        ids = self.model.generate(**inputs, **self._generate_kwargs())
        texts = [" ".join(t.split()) for t in self.processor.batch_decode(ids, skip_special_tokens=True)]
        return [
            CaptionRecord(sha, text=text)
            if text and text != prefix.lower()
            else CaptionRecord(sha, skip="empty_caption")
            for sha, text in zip(shas, texts, strict=True)
        ]
