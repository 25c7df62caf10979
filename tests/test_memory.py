"""Memory: the dtypes training loads in, frozen models freed after caching, checkpoints written one
tensor at a time (byte for byte what safetensors' ``save_file`` writes), and peaks per phase."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import weakref

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from postertune.memory import PhaseMemory, reset_resident_peak
from postertune.models.loading import load_components, save_unet
from postertune.models.prompts import PromptEncoder
from postertune.models.safetensors_writer import Pending, cast_when_written, pending, write_safetensors
from postertune.models.single_file import SDXL_METADATA, original_state_dict, save_single_file
from postertune.models.tiny import build_tiny_pipeline
from postertune.train.params import SamplingParams, TrainParams
from postertune.train.setup import Caches, component_dtypes, release_frozen
from postertune.train.text import TextCache

FROZEN = ("vae", "text_encoder", "text_encoder_2")
MIB = 2**20
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def split(data: bytes) -> tuple[dict, bytes]:
    """A safetensors file's header (parsed) and its data section."""
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + size]), data[8 + size :]


def save_file_bytes(path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> bytes:
    """What ``save_file`` writes: every tensor turned to bytes first."""
    save_file({k: t.contiguous() for k, t in tensors.items()}, path, metadata=metadata)
    return path.read_bytes()


# --- loading in the dtypes training uses ---------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({}, {"unet": torch.float32, "vae": torch.float32, "default": torch.float32}),
        ({"mixed_precision": "bf16"}, {"unet": torch.float32, "vae": torch.float32, "default": torch.bfloat16}),
        (
            {"mixed_precision": "bf16", "no_half_vae": False},
            {"unet": torch.float32, "vae": torch.bfloat16, "default": torch.bfloat16},
        ),
        (
            {"mixed_precision": "bf16", "full_bf16": True},
            {"unet": torch.bfloat16, "vae": torch.float32, "default": torch.bfloat16},
        ),
        (
            {"mixed_precision": "fp16", "no_half_vae": False},
            {"unet": torch.float32, "vae": torch.float16, "default": torch.float16},
        ),
    ],
)
def test_each_component_loads_in_the_dtype_it_is_used_in(settings, expected):
    assert component_dtypes(TrainParams(**settings)) == expected


# --- frozen models after caching ------------------------------------------------------------


@pytest.mark.parametrize(
    ("samples_every", "augment", "kept"),
    [
        (0, False, set()),  # nothing later uses them
        (0, True, {"text_encoder", "text_encoder_2"}),  # every step encodes its own captions
        (5, False, set(FROZEN)),  # training-time samples decode and encode with them
    ],
)
def test_frozen_models_are_freed_when_no_later_step_uses_them(tmp_path, samples_every, augment, kept):
    params = TrainParams(
        samples=SamplingParams(every_n_steps=samples_every),
        shuffle_caption=augment,
        caption_dropout_rate=0.0,
        long_caption_ratio=0.0,
    )
    components = load_components("tiny")
    alive = {name: weakref.ref(getattr(components, name)) for name in FROZEN}
    encode = PromptEncoder(
        components.tokenizer, components.tokenizer_2, components.text_encoder, components.text_encoder_2
    )
    texts = None if params.augments_captions else TextCache(tmp_path, "id")
    caches = Caches(plans=[], latents=None, texts=texts, encode=encode, policy=None)
    del encode

    caches = release_frozen(params, components, caches)
    gc.collect()

    assert {name for name, ref in alive.items() if ref() is not None} == kept
    assert {name for name in FROZEN if getattr(components, name) is not None} == kept
    assert (caches.encode is not None) == ("text_encoder" in kept)


# --- writing one tensor at a time -----------------------------------------------------------


def mixed_tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "b.weight": torch.randn(3, 5, dtype=torch.float16),
        "a.weight": torch.randn(4, 2),
        "transposed": torch.randn(3, 4).T,  # not contiguous
        "steps": torch.arange(3, dtype=torch.int64),
        "ids": torch.arange(4, dtype=torch.int32),
        "scale": torch.tensor(2.5, dtype=torch.bfloat16),  # 0-d
        "mask": torch.tensor([True, False, True]),
        "pixels": torch.arange(5, dtype=torch.uint8),
        "double": torch.randn(2, dtype=torch.float64),
        "empty": torch.zeros(0, 7),
    }


@pytest.mark.parametrize("metadata", [None, {}, {"format": "pt"}])
def test_streamed_file_is_byte_for_byte_what_save_file_writes(tmp_path, metadata):
    tensors = mixed_tensors()
    write_safetensors(tmp_path / "streamed.safetensors", {k: pending(t) for k, t in tensors.items()}, metadata)
    expected = save_file_bytes(tmp_path / "save_file.safetensors", tensors, metadata)
    assert (tmp_path / "streamed.safetensors").read_bytes() == expected

    with safe_open(tmp_path / "streamed.safetensors", "pt") as f:
        assert set(f.keys()) == set(tensors)
        for key, tensor in tensors.items():
            assert torch.equal(f.get_tensor(key), tensor), key


def test_streamed_metadata_is_sorted_and_the_rest_is_save_files(tmp_path):
    """``save_file`` orders metadata keys by hash (they change from process to process); the writer sorts
    them. Same keys and values, same header length: every tensor sits at the same offset."""
    tensors, metadata = mixed_tensors(), {"z": "last", "format": "pt", "m": "é"}
    write_safetensors(tmp_path / "streamed.safetensors", {k: pending(t) for k, t in tensors.items()}, metadata)
    streamed = (tmp_path / "streamed.safetensors").read_bytes()
    expected = save_file_bytes(tmp_path / "save_file.safetensors", tensors, metadata)

    assert len(streamed) == len(expected) and streamed[:8] == expected[:8]
    header, data = split(streamed)
    assert (header, data) == split(expected)
    assert list(header["__metadata__"]) == sorted(metadata)


def test_a_tensor_unlike_its_announcement_is_refused(tmp_path):
    wrong = Pending((2, 2), torch.float32, lambda: torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"w: produced \(2, 3\)"):
        write_safetensors(tmp_path / "x.safetensors", {"w": wrong})


@pytest.mark.parametrize("precision", ["float", "fp16", "bf16"])
def test_saved_unet_and_single_file_are_what_save_file_wrote(tmp_path, precision):
    """The previous save: the whole state dict cast, then ``save_file`` (with sorted metadata)."""
    tiny = build_tiny_pipeline(seed=0)
    dtype = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]

    def cast(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: t.to(dtype) if t.is_floating_point() else t for k, t in tensors.items()}

    folder = save_unet(tiny.unet, tmp_path / "unet", precision)
    expected = save_file_bytes(tmp_path / "unet.safetensors", cast(tiny.unet.state_dict()), {"format": "pt"})
    assert (folder / "diffusion_pytorch_model.safetensors").read_bytes() == expected

    parts = (tiny.unet, tiny.vae, tiny.text_encoder, tiny.text_encoder_2)
    path = save_single_file(tmp_path / "sdxl.safetensors", *parts, precision)
    expected = save_file_bytes(tmp_path / "reference.safetensors", cast(original_state_dict(*parts)), SDXL_METADATA)
    streamed = path.read_bytes()
    assert len(streamed) == len(expected) and split(streamed) == split(expected)


@pytest.mark.skipif(not reset_resident_peak(), reason="the peak resident memory cannot be reset here")
def test_streaming_holds_one_tensor_where_the_previous_save_held_them_all(tmp_path):
    """The previous save cast the whole state dict, then called ``save_file``."""
    tensors = {f"layer{i}.weight": torch.randn(1024, 1024) for i in range(48)}  # 192 MiB in float32
    written = sum(t.numel() for t in tensors.values()) * 2 / MIB  # 96 MiB in fp16
    memory = PhaseMemory(torch.device("cpu"))

    memory.start("streamed")
    write_safetensors(tmp_path / "streamed.safetensors", cast_when_written(tensors, "fp16"))
    memory.start("save_file")
    save_file({k: t.half() for k, t in tensors.items()}, tmp_path / "save_file.safetensors")
    memory.stop()

    assert memory.added["streamed"] < 0.25 * written
    assert memory.added["save_file"] > 0.75 * written


# --- peaks per phase ------------------------------------------------------------------------


PHASES_SCRIPT = """
import json, torch
from postertune.memory import PhaseMemory
memory = PhaseMemory(torch.device("cpu"))
memory.start("big")
big = torch.ones(64 * 2**20)  # 256 MiB, touched
del big
memory.start("small")
small = torch.ones(4 * 2**20)  # 16 MiB
del small
print(json.dumps(memory.metrics()))
"""


@pytest.mark.skipif(not reset_resident_peak(), reason="the peak resident memory cannot be reset here")
def test_each_phase_reports_its_own_peak():
    # a process of its own: in a long test process, memory freed by earlier tests during a
    # phase can keep its peak below the level it started at
    done = subprocess.run([sys.executable, "-c", PHASES_SCRIPT], capture_output=True, text=True, check=True)
    metrics = json.loads(done.stdout.strip().splitlines()[-1])

    assert metrics["added_memory_mb_big"] > 240
    assert metrics["added_memory_mb_small"] < 100
    assert metrics["peak_memory_mb_big"] - metrics["peak_memory_mb_small"] > 150
    assert metrics["peak_memory_mb"] == metrics["peak_memory_mb_big"]
