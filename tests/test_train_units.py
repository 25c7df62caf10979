"""The train stage's parts on their own: buckets and crops, captions, the sampler, params,
optimizers and schedules, fused Adafactor, the loss weighting and the latent cache."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import importlib.util
import io
import math
import random

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from PIL import Image, ImageOps
from transformers.optimization import Adafactor

from postertune.models.tiny import SDXL_SCHEDULER_CONFIG, tiny_unet_config, tiny_vae_config
from postertune.params import ParamError, build
from postertune.store import ShardStore
from postertune.train.buckets import Bucket, make_buckets, nearest_bucket, plan_crop
from postertune.train.captions import CaptionPolicy, shuffle_tags, split_tags
from postertune.train.data import BucketBatchSampler, TrainDataset, plan_entries, read_examples, split_validation
from postertune.train.latent_cache import LatentCache, vae_cache_id
from postertune.train.loss import LossRecipe, diffusion_loss, min_snr_weights
from postertune.train.noise import NoiseRecipe, draw_noise
from postertune.train.optim import (
    FusedAdafactor,
    check_optimizer_args,
    fuse_into_backward,
    make_lr_scheduler,
    make_optimizer,
)
from postertune.train.params import TrainParams, check_runtime
from postertune.train.timesteps import TimestepSampler
from postertune.train.tracking import TrainLog
from tests.profiles import composed_params
from tests.train_inputs import fresh_process_state, train_section, write_dataset


def params(**overrides) -> TrainParams:
    return build(TrainParams, train_section(**overrides), "train")


# --- buckets, crops, micro-conditioning -------------------------------------------------


def test_sdxl_buckets_hold_about_a_megapixel_in_steps_of_64():
    buckets = make_buckets(1024, 64, 512, 2048, 2.0)
    assert Bucket(1024, 1024) in buckets and Bucket(832, 1216) in buckets and Bucket(1216, 832) in buckets
    for b in buckets:
        assert b.width % 64 == 0 and b.height % 64 == 0
        assert 0.85 * 1024**2 <= b.width * b.height <= 1024**2
        assert max(b.width, b.height) / min(b.width, b.height) <= 2.0
    assert nearest_bucket(600, 900, buckets) == Bucket(832, 1216)  # a 2:3 poster
    assert nearest_bucket(1000, 1000, buckets) == Bucket(1024, 1024)
    assert nearest_bucket(900, 600, buckets) == Bucket(1216, 832)


@pytest.mark.parametrize(
    ("size", "bucket", "time_ids"),
    [
        # 600x900 scaled by 832/600 to 832x1248, 32 rows too tall: crop 16 from the top
        ((600, 900), Bucket(832, 1216), (900, 600, 16, 0, 1216, 832)),
        # 1000x700 scaled by 832/700 to 1189x832: 37 columns too wide, crop 18 from the left
        ((1000, 700), Bucket(1152, 832), (700, 1000, 0, 18, 832, 1152)),
        ((512, 512), Bucket(1024, 1024), (512, 512, 0, 0, 1024, 1024)),
    ],
)
def test_centre_crop_time_ids(size, bucket, time_ids):
    crop = plan_crop(*size, bucket)
    assert crop.resized_width >= bucket.width and crop.resized_height >= bucket.height
    assert crop.time_ids() == time_ids


def test_random_crop_stays_inside_and_is_repeatable():
    bucket = Bucket(832, 1216)
    crops = [plan_crop(600, 1000, bucket, random.Random(seed)) for seed in range(30)]
    assert all(0 <= c.top <= c.resized_height - bucket.height and c.left == 0 for c in crops)
    assert len({c.top for c in crops}) > 5
    assert plan_crop(600, 1000, bucket, random.Random(3)) == crops[3]


def test_mirrored_crop_counts_left_from_the_other_side():
    crop = plan_crop(1000, 700, Bucket(1152, 832), random.Random(1))
    mirrored = crop.mirrored()
    assert mirrored.flipped and mirrored.left == crop.resized_width - 1152 - crop.left
    assert mirrored.mirrored() == crop


def test_each_example_gets_the_bucket_and_crop_of_its_shape(tmp_path):
    write_dataset(tmp_path, [(200, 300), (300, 300), (300, 200), (90, 200)])
    examples = read_examples(tmp_path / "captions.parquet")
    plans = plan_entries(examples, params())
    crops = [plan[0].crop for plan in plans]
    assert [c.bucket for c in crops] == [Bucket(64, 128), Bucket(96, 96), Bucket(128, 64), Bucket(64, 128)]
    # 200x300 → 85x128 (covers 64x128): 21 spare columns, 10 cut on the left; 90x200 → 64x142: 7 rows
    assert crops[0].time_ids() == (300, 200, 0, 10, 128, 64)
    assert crops[1].time_ids() == (300, 300, 0, 0, 96, 96)
    assert crops[2].time_ids() == (200, 300, 10, 0, 64, 128)
    assert crops[3].time_ids() == (200, 90, 7, 0, 128, 64)


# --- the latent cache -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_vae():
    return tiny_model(AutoencoderKL, tiny_vae_config(), 0).eval()


def test_cached_latent_is_the_planned_crop_with_its_time_ids(tmp_path, tiny_vae):
    write_dataset(tmp_path, [(200, 300), (300, 200)])
    examples = read_examples(tmp_path / "captions.parquet")
    plans = plan_entries(examples, params(random_crop=True, flip_aug=True))
    entries = [e for plan in plans for e in plan]
    store = ShardStore(tmp_path / "shards")
    cache = LatentCache(tmp_path / "cache", vae_cache_id(tiny_vae, torch.float32))
    assert cache.fill(entries, store, tiny_vae, batch_size=4, max_pixels=10**7, show_progress=False) == 4
    assert cache.fill(entries, store, tiny_vae, batch_size=4, max_pixels=10**7, show_progress=False) == 0

    for entry in entries:
        crop = entry.crop
        original = Image.open(io.BytesIO(store.read(entry.sha256))).convert("RGB")
        resized = original.resize((crop.resized_width, crop.resized_height), Image.Resampling.LANCZOS)
        if crop.flipped:
            resized = ImageOps.mirror(resized)
        cut = resized.crop((crop.left, crop.top, crop.left + crop.bucket.width, crop.top + crop.bucket.height))
        pixels = torch.from_numpy(np.asarray(cut, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
        with torch.no_grad():
            expected = tiny_vae.encode(pixels).latent_dist.mode()[0] * tiny_vae.config.scaling_factor
        latent, time_ids = cache.load(entry)
        assert latent.shape == (4, crop.bucket.height // 8, crop.bucket.width // 8)
        torch.testing.assert_close(latent, expected, rtol=1e-5, atol=1e-5)
        assert tuple(int(v) for v in time_ids) == crop.time_ids()
    flipped = [e for e in entries if e.crop.flipped]
    assert len(flipped) == 2 and all(e.key in cache.packed for e in flipped)


def tiny_model(cls, config: dict, seed: int):
    torch.manual_seed(seed)
    return cls(**config)


def test_cache_is_keyed_by_the_vae_weights():
    same, also_same, other = (tiny_model(AutoencoderKL, tiny_vae_config(), seed) for seed in (0, 0, 1))
    assert vae_cache_id(same, torch.float32) == vae_cache_id(also_same, torch.float32)
    assert vae_cache_id(same, torch.float32) != vae_cache_id(other, torch.float32)
    assert vae_cache_id(same, torch.float32) != vae_cache_id(same, torch.float16)


# --- captions -----------------------------------------------------------------------------


def test_shuffle_keeps_the_first_keep_tokens_tags_in_place():
    caption = "movie poster, thriller, neon, rain, city, night, bold title"
    tags = split_tags(caption)
    orders = set()
    for seed in range(50):
        shuffled = split_tags(shuffle_tags(caption, 2, random.Random(seed)))
        assert shuffled[:2] == ["movie poster", "thriller"]
        assert sorted(shuffled) == sorted(tags)
        orders.add(tuple(shuffled))
    assert len(orders) > 20


def test_caption_choice_is_drawn_afresh_per_step_and_repeatable():
    policy = CaptionPolicy(shuffle=True, keep_tokens=1, dropout_rate=0.2, long_ratio=0.5)
    short, long = "poster, a, b, c, d", "A long description."
    choices = [policy.choose(short, long, random.Random(seed)) for seed in range(400)]
    assert 40 < choices.count("") < 120
    assert 120 < choices.count(long) < 200
    assert all(c.startswith("poster, ") for c in choices if c not in ("", long))
    assert [policy.choose(short, long, random.Random(seed)) for seed in range(400)] == choices
    assert CaptionPolicy(long_ratio=1.0).fixed(short, long) == long
    assert CaptionPolicy(long_ratio=1.0).fixed(short, "") == short
    assert CaptionPolicy(dropout_rate=1.0).choose(short, long, random.Random(0)) == ""


# --- the sampler --------------------------------------------------------------------------


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_global_batches_come_from_one_bucket_and_cover_every_image():
    buckets = [Bucket(64, 128)] * 7 + [Bucket(96, 96)] * 3
    sampler = BucketBatchSampler(buckets, batch_size=4, num_processes=1, rank=0, seed=5)
    assert sampler.batches_per_epoch == 3  # ceil(7/4) + ceil(3/4)
    for epoch in range(3):
        batches = sampler.epoch_batches(epoch)
        assert all(len({buckets[i] for i in batch}) == 1 for batch in batches)
        assert set().union(*batches) == set(range(10))
    assert sampler.epoch_batches(0) != sampler.epoch_batches(1)


def test_two_processes_split_exactly_what_one_process_sees():
    buckets = [Bucket(64, 128)] * 9 + [Bucket(96, 96)] * 5
    one = take(iter(BucketBatchSampler(buckets, 4, 1, 0, seed=9)), 12)
    halves = [take(iter(BucketBatchSampler(buckets, 2, 2, rank, seed=9)), 12) for rank in (0, 1)]
    assert [a + b for a, b in zip(*halves, strict=True)] == one


def test_sampler_resumes_at_any_micro_batch():
    buckets = [Bucket(64, 128)] * 5 + [Bucket(96, 96)] * 4
    full = take(iter(BucketBatchSampler(buckets, 2, 1, 0, seed=1)), 20)
    later = BucketBatchSampler(buckets, 2, 1, 0, seed=1)
    later.start = 7
    assert take(iter(later), 13) == full[7:]


def test_dataset_draws_captions_and_noise_per_sample_seed(tmp_path, tiny_vae):
    write_dataset(tmp_path, [(200, 300)])
    examples = read_examples(tmp_path / "captions.parquet")
    p = params(shuffle_caption=True, keep_tokens=1, caption_dropout_rate=0.3, noise_offset=0.1)
    plans = plan_entries(examples, p)
    cache = LatentCache(tmp_path / "cache", vae_cache_id(tiny_vae, torch.float32))
    cache.fill(plans[0], ShardStore(tmp_path / "shards"), tiny_vae, 1, 10**7, show_progress=False)
    policy = CaptionPolicy.from_params(p)
    dataset = TrainDataset(examples, plans, cache, None, policy, NoiseRecipe.from_params(p), TimestepSampler(p, 1000))
    samples = [dataset[(0, seed)] for seed in range(40)]
    captions = [s["caption"] for s in samples]
    assert "" in captions and any(c.startswith("movie poster, ") for c in captions)
    assert len({int(s["timestep"]) for s in samples}) > 30
    again = dataset[(0, 7)]
    assert again["caption"] == samples[7]["caption"] and torch.equal(again["noise"], samples[7]["noise"])
    assert torch.equal(samples[0]["time_ids"], torch.tensor(plans[0][0].crop.time_ids(), dtype=torch.float32))


def test_validation_images_are_chosen_by_hash(tmp_path):
    write_dataset(tmp_path, [(200 + i, 300) for i in range(10)])
    examples = read_examples(tmp_path / "captions.parquet")
    train, held = split_validation(examples, 3)
    assert len(held) == 3 and len(train) == 7
    assert {e.sha256 for e in held} == set(sorted(e.sha256 for e in examples)[:3])
    # a fraction of the same table, in another order, holds out the same images
    assert {e.sha256 for e in split_validation(examples[::-1], 0.3)[1]} == {e.sha256 for e in held}
    with pytest.raises(ParamError, match="train.validation.split"):
        split_validation(examples, 10)


# --- params -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "name"),
    [
        ({"optimizer": "SGD"}, "train.optimizer"),
        ({"keep_tokens": -1}, "train.keep_tokens"),
        ({"optimizer_args": {"betas_typo": [0.9, 0.99]}}, "train.optimizer_args.betas_typo"),
        ({"optimizer_args": {"betas": [0.9]}}, "train.optimizer_args"),
        ({"lr_scheduler": "cosine_annealing"}, "train.lr_scheduler"),
        ({"lr_scheduler": "linear", "lr_scheduler_args": {"power": 2}}, "train.lr_scheduler_args.power"),
        ({"lr_scheduler": "constant", "lr_warmup_steps": 10}, "train.lr_warmup_steps"),
        ({"optimizer": "Adafactor"}, "train.learning_rate"),  # relative_step by default wants lr null
        ({"optimizer": "Adafactor", "learning_rate": None}, "train.lr_scheduler"),
        (
            {"optimizer": "Adafactor", "optimizer_args": {"relative_step": False, "warmup_init": True}},
            "train.optimizer_args",
        ),
        ({"fused_backward_pass": True}, "train.fused_backward_pass"),  # AdamW
        ({"mixed_precision": "fp17"}, "train.mixed_precision"),
        ({"full_bf16": True}, "train.full_bf16"),
        ({"bucket_step": 20}, "train.bucket_step"),
        ({"resolution": 100}, "train.resolution"),
        ({"validation": {"split": 1.5}}, "train.validation.split"),
        ({"caption_dropout_rate": 2.0}, "train.caption_dropout_rate"),
        ({"validation": {"timesteps": [1000]}}, "train.validation.timesteps[0]"),
        ({"learning_rate": float("nan")}, "train.learning_rate"),
        ({"samples": {"steps": 0}}, "train.samples.steps"),
        ({"epochs": 3}, "train.epochs"),
    ],
)
def test_bad_params_name_the_parameter(overrides, name):
    with pytest.raises(ParamError) as caught:
        check_optimizer_args(params(**overrides))  # the optimizer's own args: tried before any model loads
    assert caught.value.name == name
    assert "\n" not in str(caught.value)


def test_fused_backward_pass_rules():
    base = dict(optimizer="Adafactor", optimizer_args={"relative_step": False}, fused_backward_pass=True)
    with pytest.raises(ParamError, match="train.max_grad_norm"):
        params(**base, max_grad_norm=1.0)
    with pytest.raises(ParamError, match="train.fused_backward_pass"):
        params(**base, max_grad_norm=0.0, gradient_accumulation_steps=2)
    assert params(**base, max_grad_norm=0.0).fused_backward_pass


def test_fp16_needs_a_gpu():
    fp16 = params(mixed_precision="fp16")
    with pytest.raises(ParamError) as caught:
        check_runtime(fp16, accelerator_available=False)
    assert caught.value.name == "train.mixed_precision"
    check_runtime(fp16, accelerator_available=True)
    check_runtime(params(mixed_precision="bf16"), accelerator_available=False)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed")
def test_adamw8bit_without_bitsandbytes_is_a_clear_error():
    with pytest.raises(ParamError, match="bitsandbytes") as caught:
        params(optimizer="AdamW8bit")
    assert caught.value.name == "train.optimizer"


def test_long_runs_warn_about_overfitting(caplog):
    params(max_train_steps=8000)
    assert "over-fit" in caplog.text and "8000" in caplog.text


def test_identity_ignores_what_does_not_shape_the_weights():
    a = params()
    assert (
        a.identity()
        == params(samples={"every_n_steps": 5}, checkpoints={"every_n_steps": 3}, max_train_steps=60).identity()
    )
    assert a.identity() != params(learning_rate=2e-3).identity()
    linear = params(lr_scheduler="linear")
    assert linear.identity() != params(lr_scheduler="linear", max_train_steps=60).identity()


# --- optimizers and schedules -------------------------------------------------------------


def net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.GELU(), torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 4)
    )


def fit(model, optimizer, scheduler=None, steps=3):
    torch.manual_seed(1)
    x, y = torch.randn(4, 3, 8, 8), torch.randn(4, 4)
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()


@pytest.mark.parametrize(
    "overrides",
    [
        {"optimizer": "AdamW", "optimizer_args": {"weight_decay": 0.01, "betas": [0.9, 0.99]}},
        {"optimizer": "AdamW", "optimizer_args": {"fused": True}},
        {
            "optimizer": "Adafactor",
            "optimizer_args": {
                "clip_threshold": 1.0,
                "relative_step": False,
                "scale_parameter": False,
                "warmup_init": False,
            },
        },
        {
            "optimizer": "Adafactor",
            "learning_rate": None,
            "lr_scheduler": "adafactor",
            "optimizer_args": {"relative_step": True, "scale_parameter": True, "warmup_init": True},
        },
    ],
)
def test_each_optimizer_steps(overrides):
    p = params(**overrides)
    model = net()
    before = [t.detach().clone() for t in model.parameters()]
    optimizer = make_optimizer(p, model.parameters())
    fit(model, optimizer, make_lr_scheduler(p, optimizer))
    assert all(not torch.equal(b, a) for b, a in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize(
    ("name", "args", "expected"),
    [
        ("constant", {}, lambda s: 1.0),
        ("constant_with_warmup", {}, lambda s: min(1.0, s / 4)),
        ("linear", {}, lambda s: min(s / 4, (20 - s) / 16)),
        ("cosine", {"num_cycles": 0.5}, lambda s: s / 4 if s < 4 else 0.5 * (1 + math.cos(math.pi * (s - 4) / 16))),
        ("cosine_with_restarts", {"num_cycles": 2}, None),
        ("polynomial", {"power": 2.0}, None),
        ("piecewise_constant", {"step_rules": "1:5,0.5:10,0.1"}, lambda s: 1.0 if s < 5 else (0.5 if s < 10 else 0.1)),
    ],
)
def test_each_lr_scheduler_steps(name, args, expected):
    warmup = 4 if name not in ("constant", "piecewise_constant") else 0
    p = params(lr_scheduler=name, lr_scheduler_args=args, lr_warmup_steps=warmup, max_train_steps=20, learning_rate=0.1)
    model = net()
    optimizer = make_optimizer(p, model.parameters())
    scheduler = make_lr_scheduler(p, optimizer)
    lrs = []
    for _ in range(20):
        lrs.append(scheduler.get_last_lr()[0])
        fit(model, optimizer, scheduler, steps=1)
    if expected is not None:
        assert lrs == pytest.approx([0.1 * expected(s) for s in range(20)], abs=1e-9)
    else:
        assert lrs[0] == 0.0 and max(lrs) == pytest.approx(0.1) and lrs[-1] < 0.05


@pytest.mark.usefixtures(fresh_process_state.__name__)
def test_fused_adafactor_in_backward_equals_adafactor_after_backward():
    args = dict(lr=1e-2, relative_step=False, scale_parameter=False, clip_threshold=1.0)
    unfused_unet = tiny_model(UNet2DConditionModel, tiny_unet_config(), 0)
    fused_unet = tiny_model(UNet2DConditionModel, tiny_unet_config(), 0)
    torch.manual_seed(3)
    inputs = [
        (
            torch.randn(2, 4, 8, 8),
            torch.tensor([10, 500]),
            torch.randn(2, 77, 80),
            torch.randn(2, 32),
            torch.randn(2, 6),
        )
        for _ in range(2)
    ]

    def loss_of(unet, x, t, text, pooled, time_ids):
        out = unet(x, t, encoder_hidden_states=text, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids})
        return out.sample.pow(2).mean()

    plain = Adafactor(unfused_unet.parameters(), **args)
    for batch in inputs:
        loss_of(unfused_unet, *batch).backward()
        plain.step()
        plain.zero_grad(set_to_none=True)

    fused = FusedAdafactor(fused_unet.parameters(), **args)
    handles = fuse_into_backward(fused)
    for batch in inputs:
        loss_of(fused_unet, *batch).backward()
        assert all(p.grad is None for p in fused_unet.parameters())  # freed as soon as used
    for handle in handles:
        handle.remove()

    for (name, a), b in zip(unfused_unet.named_parameters(), fused_unet.parameters(), strict=True):
        assert torch.equal(a, b), name


# --- loss ---------------------------------------------------------------------------------


def test_min_snr_weights_and_noise_offset():
    scheduler = DDPMScheduler.from_config(SDXL_SCHEDULER_CONFIG)
    t = torch.tensor([0, 100, 500, 999])
    alpha_bar = scheduler.alphas_cumprod[t]
    snr = alpha_bar / (1 - alpha_bar)
    weights = min_snr_weights(scheduler, t, 5.0)
    torch.testing.assert_close(weights, torch.minimum(snr, torch.tensor(5.0)) / snr)
    assert weights[0] < 0.01 and weights[-1] == 1.0

    pred, target = torch.zeros(4, 4, 2, 2), torch.ones(4, 4, 2, 2)
    assert diffusion_loss(pred, target, t, scheduler, LossRecipe()).item() == 1.0
    assert diffusion_loss(pred, target, t, scheduler, LossRecipe(5.0)).item() == pytest.approx(weights.mean().item())

    generator = torch.Generator().manual_seed(0)
    shifts = torch.stack(
        [draw_noise(torch.Size((4, 64, 64)), generator, NoiseRecipe(0.5)).mean(dim=(1, 2)) for _ in range(50)]
    )
    assert 0.3 < shifts.std().item() < 0.7  # each channel moved by offset × N(0, 1)
    plain = torch.stack(
        [draw_noise(torch.Size((4, 64, 64)), generator, NoiseRecipe(0.0)).mean(dim=(1, 2)) for _ in range(50)]
    )
    assert plain.std().item() < 0.05


# --- the DVCLive log ----------------------------------------------------------------------


def test_resumed_log_forgets_what_came_after_the_checkpoint(tmp_path):
    folder = tmp_path / "dvclive/train"
    log = TrainLog(folder, resume_step=None, enabled=True)
    for step in range(1, 6):  # the interrupted run got to step 5; its last checkpoint is step 3
        log.metrics(step, {"train/loss": 1.0 / step})
        if step % 2 == 0:
            log.images(step, {"prompt-0": Image.new("RGB", (8, 8))})

    resumed = TrainLog(folder, resume_step=3, enabled=True)
    resumed.metrics(4, {"train/loss": 0.3})
    resumed.close()
    rows = (folder / "plots/metrics/train/loss.tsv").read_text().splitlines()
    assert [r.split("\t")[0] for r in rows] == ["step", "1", "2", "3", "4"] and rows[-1].endswith("\t0.3")
    assert [p.name for p in (folder / "plots/images/prompt-0").iterdir()] == ["0000002.png"]


def test_switching_the_sdxl_profile_to_adamw_names_every_arg_to_drop():
    section = composed_params("sdxl")["train"]
    section.update(base="tiny", vae=None, optimizer="AdamW")
    with pytest.raises(ParamError, match=r"-S train.fused_backward_pass=false"):
        build(TrainParams, section, "train")
    section.update(fused_backward_pass=False)
    with pytest.raises(ParamError) as caught:
        check_optimizer_args(build(TrainParams, section, "train"))
    assert caught.value.name == "train.optimizer_args.scale_parameter"
    assert str(caught.value).endswith("-S 'train.optimizer_args={weight_decay:0.0}')")
    section.update(optimizer_args={"weight_decay": 0.0})
    check_optimizer_args(build(TrainParams, section, "train"))
