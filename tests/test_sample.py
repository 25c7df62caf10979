"""The sample stage: prompts and negative presets, incremental rendering, grids, errors.

Models are the tiny SDXL-architecture pipeline saved as a diffusers folder (the "base")
and a perturbed copy of its U-Net (the "fine-tuned" one), rendered on CPU at 64×64.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from PIL import Image

from postertune.cli import run_stage
from postertune.errors import PipelineError
from postertune.models.loading import load_unet, save_unet
from postertune.models.schedule import inference_scheduler
from postertune.models.single_file import save_single_file
from postertune.models.tiny import SDXL_SCHEDULER_CONFIG, save_tiny_pipeline
from postertune.params import ParamError, build
from postertune.sample.grid import make_grid
from postertune.sample.manifest import MANIFEST_NAME, read_manifest
from postertune.sample.params import SampleParams
from postertune.sample.prompts import combine_negative, load_presets, load_prompts
from postertune.sample.render import model_pipeline
from postertune.sample.run import run, sample
from postertune.sample.schedulers import SCHEDULERS, make_scheduler

PROJECT = Path(__file__).resolve().parents[1]
PROMPTS = PROJECT / "data" / "prompts" / "posters.csv"
PRESETS = PROJECT / "data" / "prompts" / "negative_presets.yaml"
GUIDE = Path(
    os.environ.get("POSTERTUNE_GUIDE", PROJECT.parent / "shared" / "reference" / "sdxl-poster-finetune-guide.txt")
)

PET_BAG = (
    "A feline peering out from a striped transparent travel bag with a bicycle in the background. Outdoor setting, "
    "sunset ambiance. Product advertisement of pet bag, No humans, focus on cat and bag, vibrant colors, "
    "recreational theme"
)
SKINCARE = (
    "Four amber glass bottles with droppers placed side by side, arranged on a white background, skincare product "
    "promotion, no individuals present, still life setup"
)
POSTERLAYOUT_CATEGORIES = {
    "food_beverages",
    "cosmetics_accessories",
    "electronics_office",
    "toys_instruments",
    "apparel",
    "sports_transportation",
    "groceries",
    "appliances_decor",
    "fresh_produce",
}


def perturbed_unet(base: Path, dest: Path, seed: int) -> Path:
    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    unet.save_pretrained(dest, safe_serialization=True)
    return dest


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    base = save_tiny_pipeline(root / "base", seed=0)
    return {
        "base": base,
        "unet": perturbed_unet(base, root / "unet", seed=1),
        "unet_retrained": perturbed_unet(base, root / "unet_retrained", seed=2),
    }


def make_params(out: Path, weights: dict[str, Path], **overrides) -> SampleParams:
    data = dict(
        models=[
            dict(name="finetuned", base=str(weights["base"]), unet=str(weights["unet"])),
            dict(name="base", base=str(weights["base"])),
        ],
        prompts=str(PROMPTS),
        negative_presets=str(PRESETS),
        prompt_ids=["pet_bag", "mecha_anime"],
        images_per_prompt=1,
        steps=2,
        width=64,
        height=64,
        grid_cell_width=64,
        device="cpu",
        output=str(out),
    )
    data.update(overrides)
    return build(SampleParams, data, "sample")


def image_bytes(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted((out / "images").rglob("*.png"))}


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# --- prompts and negative presets -------------------------------------------------------


@pytest.mark.skipif(not GUIDE.is_file(), reason="the guide text is not beside the repository")
def test_negative_presets_are_the_guides_four_lists_verbatim():
    guide = GUIDE.read_text(encoding="utf-8")
    presets = load_presets(PRESETS)
    assert list(presets) == ["basic", "anime_characters", "realistic_characters", "non_adult"]
    for heading, name in [
        ("1. Basic Negative Prompts: ", "basic"),
        ("2. For Animated Characters: ", "anime_characters"),
        ("3. For Realistic Characters: ", "realistic_characters"),
        ("4. For Non-Adult Content: ", "non_adult"),
    ]:
        assert f"{heading}{presets[name]}\n" in guide + "\n", name


def test_presets_combine_in_order_each_term_once_then_free_text():
    presets = {"a": "red, blue , green.", "b": "green, yellow.", "c": "nsfw."}
    assert combine_negative(["a", "b"], presets) == "red, blue, green, yellow"
    assert combine_negative(["c", "a"], presets, "blurry, red") == "nsfw, red, blue, green, blurry"
    assert combine_negative([], presets, "") == ""


@pytest.mark.skipif(not GUIDE.is_file(), reason="the guide text is not beside the repository")
def test_prompt_file_carries_the_guides_product_prompts_verbatim():
    guide = GUIDE.read_text(encoding="utf-8")
    prompts = {p.id: p for p in load_prompts(PROMPTS, load_presets(PRESETS))}
    assert f"\n{prompts['pet_bag'].prompt}\n" in guide
    assert f"\n{prompts['skincare_essence'].prompt}\n" in guide


def test_prompt_file_covers_posterlayout_categories_and_movie_tv_anime():
    prompts = load_prompts(PROMPTS, load_presets(PRESETS))
    by_id = {p.id: p for p in prompts}
    assert by_id["pet_bag"].prompt == PET_BAG
    assert by_id["skincare_essence"].prompt == SKINCARE
    assert {p.category for p in prompts} >= POSTERLAYOUT_CATEGORIES | {"movie", "tv", "anime"}
    assert all(p.negative_presets for p in prompts)


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        ("pet_bag,apparel,basic,a second prompt with the same id", "duplicate id 'pet_bag'"),
        ("shirt,apparel,basic,", "empty prompt"),
        ("shirt,apparel,basic+gothic,a shirt poster", "unknown negative preset 'gothic'"),
        ("Shirt Poster,apparel,basic,a shirt poster", "id 'Shirt Poster'"),
        ("shirt,apparel,basic", "expected 4 fields"),
    ],
)
def test_bad_prompt_row_gives_one_line_error_naming_file_and_line(tmp_path, row, problem):
    path = write_csv(tmp_path / "prompts.csv", f"id,category,negative,prompt\npet_bag,apparel,basic,a bag\n{row}\n")
    with pytest.raises(PipelineError) as err:
        load_prompts(path, load_presets(PRESETS))
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{path} line 3: ")
    assert problem in message


def test_prompt_file_without_a_column_is_refused(tmp_path):
    path = write_csv(tmp_path / "prompts.csv", "id,prompt\npet_bag,a bag\n")
    with pytest.raises(PipelineError, match=r"prompts\.csv: missing column 'category'"):
        load_prompts(path, load_presets(PRESETS))


# --- params -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "name"),
    [
        (dict(scheduler="k_lms"), "sample.scheduler"),
        (dict(width=100), "sample.width"),
        (dict(images_per_prompt=0), "sample.images_per_prompt"),
        (dict(models=[dict(name="Base Model", base="tiny")]), "sample.models[0].name"),
        (dict(models=[dict(name="a", base="tiny"), dict(name="a", base="tiny")]), "sample.models[1].name"),
    ],
)
def test_bad_params_name_the_parameter(tmp_path, override, name):
    with pytest.raises(ParamError) as err:
        make_params(tmp_path, {"base": tmp_path, "unet": tmp_path}, **override)
    assert err.value.name == name


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_every_named_scheduler_builds_from_the_sdxl_noise_schedule(name):
    scheduler = make_scheduler(name, dict(SDXL_SCHEDULER_CONFIG))
    scheduler.set_timesteps(5)
    assert len(scheduler.timesteps) >= 5
    assert scheduler.config.beta_schedule == "scaled_linear"
    assert scheduler.config.prediction_type == "epsilon"


def test_missing_model_path_stops_the_stage_with_one_line(tmp_path, monkeypatch, capsys):
    missing = tmp_path / "no-such-model"
    (tmp_path / "params.yaml").write_text(
        f"sample:\n  models:\n    - name: base\n      base: {missing}\n  prompts: {PROMPTS}\n"
        f"  negative_presets: {PRESETS}\n  output: {tmp_path / 'out'}\n"
    )
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        run_stage("sample", SampleParams, run)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"sample: error: param sample.models[0].base: {missing}: no such file or folder"
    ]
    assert not (tmp_path / "out").exists()


def test_missing_unet_folder_names_the_parameter(tmp_path, models):
    params = make_params(tmp_path / "out", {**models, "unet": tmp_path / "gone"})
    with pytest.raises(ParamError, match=r"gone does not exist") as err:
        sample(params)
    assert err.value.name == "sample.models[0].unet"


# --- grids ------------------------------------------------------------------------------


def test_grid_puts_models_in_labelled_columns_and_seeds_in_rows():
    colours = [[(255, 0, 0), (0, 0, 255)], [(0, 255, 0), (255, 255, 0)]]
    cells = [[Image.new("RGB", (32, 48), c) for c in row] for row in colours]
    sheet = np.asarray(make_grid(cells, ["finetuned", "base"], ["seed 0", "seed 1"], "pet_bag: a poster", 64))
    found = {}
    for colour in {c for row in colours for c in row}:
        ys, xs = np.nonzero(np.all(sheet == colour, axis=-1))
        assert len(ys) == 64 * 96, colour  # every cell scaled to 64 px wide, aspect kept
        found[colour] = (ys.min(), xs.min())
    (r0, c0), (r0b, c1) = found[(255, 0, 0)], found[(0, 0, 255)]
    (r1, c0b), (r1b, c1b) = found[(0, 255, 0)], found[(255, 255, 0)]
    assert r0 == r0b < r1 == r1b and c0 == c0b < c1 == c1b
    # the header above each column holds its label: dark text pixels over the cell
    header = sheet[r0 - 20 : r0, :]
    for left in (c0, c1):
        assert (header[:, left : left + 64].min(axis=-1) < 100).any()


# --- rendering --------------------------------------------------------------------------


@pytest.mark.slow
def test_rendering_is_deterministic_incremental_and_prunes(tmp_path, models):
    out = tmp_path / "a"
    first = sample(make_params(out, models))
    assert (first.images, first.result.rendered, first.result.reused) == (4, 4, 0)
    rendered = image_bytes(out)
    assert sorted(rendered) == [
        f"images/{m}/{p}/seed-0.png" for m in ("base", "finetuned") for p in ("mecha_anime", "pet_bag")
    ]
    manifest = read_manifest(out)
    assert {r["model"] for r in manifest.values()} == {"finetuned", "base"}
    assert {(r["prompt_id"], r["seed"]) for r in manifest.values() if r["model"] == "finetuned"} == {
        (r["prompt_id"], r["seed"]) for r in manifest.values() if r["model"] == "base"
    }
    assert rendered["images/finetuned/pet_bag/seed-0.png"] != rendered["images/base/pet_bag/seed-0.png"]
    assert sorted(p.name for p in first.grids) == ["mecha_anime.png", "pet_bag.png"]

    # nothing changed: nothing renders, nothing is rewritten
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")}
    again = sample(make_params(out, models))
    assert (again.result.rendered, again.result.reused) == (0, 4)
    assert {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")} == mtimes

    # the same seeds in a fresh run give byte-identical images
    sample(make_params(tmp_path / "b", models))
    assert image_bytes(tmp_path / "b") == rendered

    # a lost image (killed run, deleted file) is the only one rendered again
    (out / "images/base/pet_bag/seed-0.png").unlink()
    healed = sample(make_params(out, models))
    assert (healed.result.rendered, healed.result.reused) == (1, 3)
    assert image_bytes(out) == rendered

    # new fine-tuned weights: only the fine-tuned model renders again
    retrained = sample(make_params(out, {**models, "unet": models["unet_retrained"]}))
    assert (retrained.result.rendered, retrained.result.reused) == (2, 2)
    now = image_bytes(out)
    assert now["images/base/pet_bag/seed-0.png"] == rendered["images/base/pet_bag/seed-0.png"]
    assert now["images/finetuned/pet_bag/seed-0.png"] != rendered["images/finetuned/pet_bag/seed-0.png"]

    # a prompt dropped from the selection: its images and grid go, the rest stays
    fewer = sample(make_params(out, {**models, "unet": models["unet_retrained"]}, prompt_ids=["pet_bag"]))
    assert (fewer.result.rendered, fewer.result.reused) == (0, 2)
    assert sorted(image_bytes(out)) == ["images/base/pet_bag/seed-0.png", "images/finetuned/pet_bag/seed-0.png"]
    assert sorted(p.name for p in (out / "grids").iterdir()) == ["pet_bag.png"]
    assert len(read_manifest(out)) == 2
    assert (out / MANIFEST_NAME).read_text().startswith("model,prompt_id,")


@pytest.mark.slow
def test_single_file_checkpoint_renders_like_its_diffusers_folder(tmp_path, models):
    pipe = StableDiffusionXLPipeline.from_pretrained(models["base"])
    checkpoint = save_single_file(
        tmp_path / "community.safetensors", pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, "float"
    )
    params = make_params(
        tmp_path / "out",
        models,
        models=[
            dict(name="folder", base=str(models["base"])),
            dict(name="community", base=str(checkpoint), single_file_config=str(models["base"])),
        ],
        prompt_ids=["pet_bag"],
    )
    sample(params)
    folder = np.asarray(Image.open(tmp_path / "out/images/folder/pet_bag/seed-0.png"), dtype=np.int16)
    single = np.asarray(Image.open(tmp_path / "out/images/community/pet_bag/seed-0.png"), dtype=np.int16)
    assert np.abs(folder - single).max() <= 1


def test_v_prediction_fine_tune_renders_on_its_own_zero_snr_trailing_schedule(tmp_path, models):
    """The U-Net folder's saved schedule (as the train stage writes it) decides how it is sampled:
    the same weights render differently as a v-prediction, zero-terminal-SNR model."""
    base = StableDiffusionXLPipeline.from_pretrained(models["base"]).scheduler
    unet = load_unet(models["unet"])
    vpred = save_unet(unet, tmp_path / "vpred", "float", inference_scheduler(base, "v_prediction", True))
    eps = save_unet(unet, tmp_path / "eps", "float", inference_scheduler(base, "epsilon", False))
    weights = {"base": models["base"], "unet": vpred}
    vpred_only = [dict(name="vpred", base=str(models["base"]), unet=str(vpred))]
    both = [*vpred_only, dict(name="eps", base=str(models["base"]), unet=str(eps))]
    params = make_params(tmp_path / "out", weights, models=both, prompt_ids=["pet_bag"], guidance_rescale=0.7)

    scheduler = model_pipeline(params.models[0], params).scheduler
    assert type(scheduler).__name__ == "EulerDiscreteScheduler"  # sample.scheduler: euler
    assert (scheduler.config.prediction_type, scheduler.config.rescale_betas_zero_snr) == ("v_prediction", True)
    assert scheduler.config.timestep_spacing == "trailing"
    scheduler.set_timesteps(params.steps)
    assert scheduler.timesteps[0].item() == 999  # sampling starts from pure noise
    plain = model_pipeline(params.models[1], params).scheduler.config
    assert (plain.prediction_type, plain.timestep_spacing) == ("epsilon", "leading")

    sample(params)
    images = image_bytes(tmp_path / "out")
    assert images["images/vpred/pet_bag/seed-0.png"] != images["images/eps/pet_bag/seed-0.png"]
    # guidance_rescale is part of the render settings and changes the pixels
    sample(make_params(tmp_path / "unrescaled", weights, models=vpred_only, prompt_ids=["pet_bag"]))
    unrescaled = image_bytes(tmp_path / "unrescaled")["images/vpred/pet_bag/seed-0.png"]
    assert unrescaled != images["images/vpred/pet_bag/seed-0.png"]

    # a sampler that cannot rescale the betas is refused before anything renders
    with pytest.raises(ParamError, match="heun cannot sample vpred") as err:
        sample(make_params(tmp_path / "heun", weights, models=vpred_only, scheduler="heun"))
    assert err.value.name == "sample.scheduler"
    assert not (tmp_path / "heun").exists()
