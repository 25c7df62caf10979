"""The train recipe knobs do what they say: the timesteps drawn follow the chosen distribution,
the loss weights and Huber losses equal their formulas, multires noise and input perturbation
change the noise as documented, v-prediction with zero terminal SNR trains and samples on its
own schedule, and bad combinations fail on load naming the param."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, EulerDiscreteScheduler, UNet2DConditionModel
from safetensors.torch import load_file
from scipy import special, stats

from postertune.models.schedule import SCHEDULE_FILE, inference_scheduler, training_scheduler
from postertune.models.tiny import SDXL_SCHEDULER_CONFIG, tiny_unet_config, tiny_vae_config
from postertune.params import ParamError, build
from postertune.store import ShardStore
from postertune.train.captions import CaptionPolicy
from postertune.train.data import TrainDataset, plan_entries, read_examples
from postertune.train.latent_cache import LatentCache, vae_cache_id
from postertune.train.loss import LossRecipe, debiased_weights, diffusion_loss, diffusion_target, min_snr_weights
from postertune.train.noise import NoiseRecipe, draw_noise, perturb
from postertune.train.params import TrainParams, load_train_params
from postertune.train.run import run as train
from postertune.train.step import denoise
from postertune.train.timesteps import TimestepSampler
from tests.test_train_recipes import SCALED, val_losses, write_twin_posters
from tests.train_inputs import fresh_process_state, train_section, write_dataset, write_params

DRAWS = 10_000
N = 1000


def params(**overrides) -> TrainParams:
    return build(TrainParams, train_section(**overrides), "train")


def draw_timesteps(p: TrainParams, seed: int = 0) -> np.ndarray:
    sampler, generator = TimestepSampler(p, N), torch.Generator().manual_seed(seed)
    return np.array([int(sampler.draw(generator)) for _ in range(DRAWS)])


def spread(t: np.ndarray, low: int, high: int) -> np.ndarray:
    """Integer steps spread uniformly over their 1/n-wide slices of (0, 1): a step drawn as
    floor(u·n) comes back as a draw of u's own distribution, for a continuous KS test."""
    return (t - low + np.random.default_rng(1).random(len(t))) / (high - low)


def logit_normal_cdf(mean: float, std: float):
    return lambda x: stats.norm.cdf((special.logit(x) - mean) / std)


# --- timesteps ----------------------------------------------------------------------------


def test_default_draws_are_the_plain_randint_of_before():
    sampler = TimestepSampler(params(), N)
    a, b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert [int(sampler.draw(a)) for _ in range(200)] == [int(torch.randint(0, N, (), generator=b)) for _ in range(200)]


def test_uniform_draws_fill_min_to_max_timestep():
    t = draw_timesteps(params(min_timestep=200, max_timestep=700))
    assert t.min() == 200 and t.max() == 699
    assert stats.kstest(spread(t, 200, 700), "uniform").pvalue > 0.01


def test_logit_normal_draws_follow_its_cdf_within_the_bounds():
    mean, std = -0.5, 0.8
    t = draw_timesteps(params(timestep_sampling="logit_normal", logit_mean=mean, logit_std=std, min_timestep=100))
    assert t.min() >= 100 and t.max() < N
    assert stats.kstest(spread(t, 100, N), logit_normal_cdf(mean, std)).pvalue > 0.01
    # the test tells the two apart: neither passes for the other's draws
    assert stats.kstest(spread(t, 100, N), "uniform").pvalue < 1e-6
    uniform = draw_timesteps(params(min_timestep=100))
    assert stats.kstest(spread(uniform, 100, N), logit_normal_cdf(mean, std)).pvalue < 1e-6


def expected_probabilities(p: TrainParams, multiplier: float) -> np.ndarray:
    """Each step's probability, written out from the documented semantics."""
    low, high = p.min_timestep, p.max_timestep
    probs = np.zeros(N)
    if p.timestep_sampling == "logit_normal":
        edges = np.arange(high - low + 1) / (high - low)  # cdf: 0 at 0, 1 at 1
        probs[low:high] = np.diff(logit_normal_cdf(p.logit_mean, p.logit_std)(edges))
    else:
        probs[low:high] = 1.0
    biased = {
        "earlier": slice(low, low + round(p.timestep_bias_portion * (high - low))),
        "later": slice(high - round(p.timestep_bias_portion * (high - low)), high),
        "range": slice(p.timestep_bias_begin, p.timestep_bias_end),
    }[p.timestep_bias_strategy]
    probs[biased] *= multiplier
    return probs / probs.sum()


def chi_square_pvalue(t: np.ndarray, probs: np.ndarray, width: int = 50) -> float:
    observed = np.bincount(t, minlength=N).reshape(-1, width).sum(axis=1)
    expected = probs.reshape(-1, width).sum(axis=1) * len(t)
    keep = expected > 5
    assert observed[~keep].sum() == 0  # nothing drawn where the distribution has (almost) no mass
    return stats.chisquare(observed[keep], expected[keep] * observed[keep].sum() / expected[keep].sum()).pvalue


@pytest.mark.parametrize(
    "overrides",
    [
        dict(timestep_bias_strategy="later", timestep_bias_multiplier=3.0),
        dict(
            timestep_bias_strategy="earlier", timestep_bias_multiplier=0.2, timestep_bias_portion=0.5, max_timestep=800
        ),
        dict(
            timestep_bias_strategy="range", timestep_bias_multiplier=5.0, timestep_bias_begin=300, timestep_bias_end=450
        ),
        dict(
            timestep_sampling="logit_normal",
            timestep_bias_strategy="range",
            timestep_bias_multiplier=4.0,
            timestep_bias_begin=700,
            timestep_bias_end=900,
        ),
    ],
    ids=["later", "earlier-bounded", "range", "logit_normal-range"],
)
def test_biased_draws_follow_the_weighted_distribution(overrides):
    p = params(**overrides)
    t = draw_timesteps(p)
    assert t.min() >= p.min_timestep and t.max() < p.max_timestep
    assert chi_square_pvalue(t, expected_probabilities(p, p.timestep_bias_multiplier)) > 0.001
    assert chi_square_pvalue(t, expected_probabilities(p, 1.0)) < 1e-6  # the bias shows


# --- loss weights and Huber losses --------------------------------------------------------

T = torch.tensor([0, 10, 500, 998, 999])


def snr_of(scheduler) -> torch.Tensor:
    alpha_bar = scheduler.alphas_cumprod[T].double()
    return alpha_bar / (1 - alpha_bar)


def test_weights_equal_their_formulas_for_epsilon_and_v_prediction_with_zero_terminal_snr():
    eps = DDPMScheduler.from_config(SDXL_SCHEDULER_CONFIG)
    snr = snr_of(eps)
    check = dict(rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(debiased_weights(eps, T).double(), 1 / snr.clamp(max=1000).sqrt(), **check)
    torch.testing.assert_close(min_snr_weights(eps, T, 5.0).double(), snr.clamp(max=5) / snr, **check)
    assert snr[0] > 1000  # t = 0 sits above kohya-ss's cap, which then holds the weight

    v = training_scheduler(SDXL_SCHEDULER_CONFIG, "v_prediction", True)
    snr = snr_of(v)
    assert snr[-1] == 0
    debiased, min_snr = debiased_weights(v, T).double(), min_snr_weights(v, T, 5.0).double()
    torch.testing.assert_close(debiased, snr.clamp(max=1000).sqrt() / (snr + 1), **check)
    torch.testing.assert_close(min_snr, snr.clamp(max=5) / (snr + 1), **check)
    # zero SNR: finite, 0 (the epsilon-space weight carried over by SNR / (SNR + 1))
    assert torch.isfinite(debiased).all() and debiased[-1] == 0 and min_snr[-1] == 0

    prediction, target = torch.zeros(len(T), 4, 2, 2), torch.ones(len(T), 4, 2, 2)
    loss = diffusion_loss(prediction, target, T, v, LossRecipe(debiased=True))
    assert loss.item() == pytest.approx(debiased.mean().item(), rel=1e-5)


def huber_threshold_formula(scheduler, schedule: str, c: float) -> torch.Tensor:
    if schedule == "constant":
        return torch.full(T.shape, c, dtype=torch.float64)
    if schedule == "exponential":
        return torch.exp(math.log(c) * T.double() / N)
    alpha_bar = scheduler.alphas_cumprod[T].double()
    return (1 - c) / (1 + ((1 - alpha_bar) / alpha_bar).sqrt()) ** 2 + c


@pytest.mark.parametrize("schedule", ["constant", "exponential", "snr"])
@pytest.mark.parametrize("loss_type", ["huber", "smooth_l1"])
def test_huber_losses_equal_their_formulas(loss_type, schedule):
    scheduler = DDPMScheduler.from_config(SDXL_SCHEDULER_CONFIG)
    generator = torch.Generator().manual_seed(0)
    prediction = torch.randn((len(T), 4, 8, 8), generator=generator)
    target = torch.randn((len(T), 4, 8, 8), generator=generator)
    c = huber_threshold_formula(scheduler, schedule, 0.2).view(-1, 1, 1, 1)
    r2 = (prediction.double() - target.double()) ** 2
    elementwise = 2 * ((r2 + c**2).sqrt() - c) * (c if loss_type == "huber" else 1)
    recipe = LossRecipe(loss_type=loss_type, huber_schedule=schedule, huber_c=0.2)
    loss = diffusion_loss(prediction, target, T, scheduler, recipe)
    assert loss.item() == pytest.approx(elementwise.mean().item(), rel=1e-5)


def test_huber_is_squared_error_near_zero_and_linear_far_out():
    scheduler = DDPMScheduler.from_config(SDXL_SCHEDULER_CONFIG)
    t = torch.tensor([500])
    recipe = LossRecipe(loss_type="huber", huber_schedule="constant", huber_c=0.1)
    small, big = torch.full((1, 4, 2, 2), 0.001), torch.full((1, 4, 2, 2), 100.0)
    zero = torch.zeros(1, 4, 2, 2)
    assert diffusion_loss(small, zero, t, scheduler, recipe).item() == pytest.approx(0.001**2, rel=1e-3)
    assert diffusion_loss(big, zero, t, scheduler, recipe).item() == pytest.approx(2 * 0.1 * (100 - 0.1), rel=1e-4)


# --- noise --------------------------------------------------------------------------------


def low_frequency_variance(noise: torch.Tensor, block: int = 8) -> float:
    """Variance of the block means: 1/block² for white noise of unit variance."""
    return F.avg_pool2d(noise[None], block).var().item()


def test_multires_noise_adds_coarse_scales_at_unit_std():
    shape = torch.Size((4, 128, 128))
    plain = draw_noise(shape, torch.Generator().manual_seed(0), NoiseRecipe())
    pyramid = draw_noise(
        shape, torch.Generator().manual_seed(0), NoiseRecipe(multires_iterations=6, multires_discount=0.8)
    )
    weak = draw_noise(
        shape, torch.Generator().manual_seed(0), NoiseRecipe(multires_iterations=6, multires_discount=0.1)
    )
    assert pyramid.std().item() == pytest.approx(1.0, abs=1e-5) and weak.std().item() == pytest.approx(1.0, abs=1e-5)
    white = low_frequency_variance(plain)
    assert white == pytest.approx(1 / 64, rel=0.2)
    # the coarse scales carry much of the variance at 8×8 blocks; a small discount keeps them faint
    assert low_frequency_variance(pyramid) > 5 * white
    assert low_frequency_variance(weak) < 1.5 * white
    assert not torch.equal(pyramid[:, :4, :4], plain[:, :4, :4])
    again = draw_noise(
        shape, torch.Generator().manual_seed(0), NoiseRecipe(multires_iterations=6, multires_discount=0.8)
    )
    assert torch.equal(again, pyramid)


@pytest.fixture(scope="module")
def tiny_unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(**tiny_unet_config()).eval()


def tiny_batch(generator: torch.Generator) -> dict:
    return {
        "latent": torch.randn((2, 4, 8, 8), generator=generator),
        "noise": torch.randn((2, 4, 8, 8), generator=generator),
        "timestep": torch.tensor([300, 999]),
        "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2),
        "prompt_embeds": torch.randn((2, 77, tiny_unet_config()["cross_attention_dim"]), generator=generator),
        "pooled_prompt_embeds": torch.randn((2, 32), generator=generator),
    }


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_input_perturbation_changes_the_noised_input_not_the_target(tiny_unet, prediction_type):
    scheduler = training_scheduler(SDXL_SCHEDULER_CONFIG, prediction_type, prediction_type == "v_prediction")
    generator = torch.Generator().manual_seed(0)
    batch = tiny_batch(generator)
    perturbed = {**batch, "input_noise": perturb(batch["noise"], generator, 0.1)}
    seen = []
    hook = tiny_unet.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    with torch.no_grad():
        _, target = denoise(tiny_unet, batch, scheduler)
        _, perturbed_target = denoise(tiny_unet, perturbed, scheduler)
    hook.remove()
    latents, noise, t = batch["latent"], batch["noise"], batch["timestep"]
    torch.testing.assert_close(seen[1], scheduler.add_noise(latents, perturbed["input_noise"], t))
    assert (seen[1] - seen[0]).abs().max() > 0.01
    assert torch.equal(perturbed_target, target)
    expected = noise if prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, t)
    torch.testing.assert_close(target, expected)


def test_dataset_adds_perturbed_noise_only_under_input_perturbation(tmp_path):
    write_dataset(tmp_path, [(200, 300)])
    examples = read_examples(tmp_path / "captions.parquet")
    torch.manual_seed(0)
    vae = AutoencoderKL(**tiny_vae_config()).eval()
    plans = plan_entries(examples, params())
    cache = LatentCache(tmp_path / "cache", vae_cache_id(vae, torch.float32))
    cache.fill(plans[0], ShardStore(tmp_path / "shards"), vae, 1, 10**7, show_progress=False)

    def sample(**overrides) -> dict:
        p = params(**overrides)
        policy, noise = CaptionPolicy.from_params(p), NoiseRecipe.from_params(p)
        return TrainDataset(examples, plans, cache, None, policy, noise, TimestepSampler(p, N))[(0, 5)]

    plain, perturbed = sample(), sample(input_perturbation=0.1)
    assert "input_noise" not in plain
    assert torch.equal(perturbed["noise"], plain["noise"]) and perturbed["timestep"] == plain["timestep"]
    assert (perturbed["input_noise"] - perturbed["noise"]).std().item() == pytest.approx(0.1, rel=0.2)


# --- prediction type and zero terminal SNR ------------------------------------------------


def test_v_prediction_targets_are_the_velocity_and_zero_snr_ends_in_pure_noise():
    base = DDPMScheduler.from_config(SDXL_SCHEDULER_CONFIG)
    v = training_scheduler(base.config, "v_prediction", True)
    assert v.alphas_cumprod[-1].item() == 0.0 and base.alphas_cumprod[-1].item() > 0.004
    assert v.alphas_cumprod[0].item() == pytest.approx(base.alphas_cumprod[0].item(), rel=1e-6)
    generator = torch.Generator().manual_seed(0)
    latents, noise = (
        torch.randn((len(T), 4, 8, 8), generator=generator),
        torch.randn((len(T), 4, 8, 8), generator=generator),
    )
    alpha_bar = v.alphas_cumprod[T].view(-1, 1, 1, 1)
    target = diffusion_target(v, latents, noise, T)
    torch.testing.assert_close(target, alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents)
    torch.testing.assert_close(target[-1], -latents[-1])  # at zero SNR: the image itself, negated
    assert torch.equal(diffusion_target(base, latents, noise, T), noise)


def test_inference_scheduler_samples_from_the_last_step():
    base = EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG)
    v = inference_scheduler(base, "v_prediction", True)
    assert (v.config.prediction_type, v.config.rescale_betas_zero_snr, v.config.timestep_spacing) == (
        "v_prediction",
        True,
        "trailing",
    )
    v.set_timesteps(4)
    assert v.timesteps[0].item() == 999
    assert dict(inference_scheduler(base, "epsilon", False).config) == dict(base.config)


# --- params -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "name"),
    [
        ({"rescale_betas_zero_snr": True}, "train.rescale_betas_zero_snr"),  # epsilon
        ({"debiased_estimation_loss": True}, "train.debiased_estimation_loss"),  # with snr_gamma 5
        ({"huber_c": 0.2}, "train.huber_c"),  # l2
        ({"huber_schedule": "constant"}, "train.huber_schedule"),
        ({"loss_type": "huber", "huber_c": 0.0}, "train.huber_c"),
        ({"logit_mean": 0.5}, "train.logit_mean"),  # uniform
        ({"timestep_sampling": "logit_normal", "logit_std": 0.0}, "train.logit_std"),
        ({"timestep_bias_multiplier": 2.0}, "train.timestep_bias_multiplier"),  # no strategy
        ({"timestep_bias_strategy": "later"}, "train.timestep_bias_multiplier"),  # 1.0 biases nothing
        (
            {"timestep_bias_strategy": "later", "timestep_bias_multiplier": 2.0, "timestep_bias_portion": 1.0},
            "train.timestep_bias_portion",
        ),  # fmt: skip
        (
            {"timestep_bias_strategy": "range", "timestep_bias_multiplier": 2.0, "timestep_bias_portion": 0.5},
            "train.timestep_bias_portion",
        ),  # fmt: skip
        (
            {"timestep_bias_strategy": "later", "timestep_bias_multiplier": 2.0, "timestep_bias_end": 500},
            "train.timestep_bias_end",
        ),  # fmt: skip
        (
            {
                "timestep_bias_strategy": "range",
                "timestep_bias_multiplier": 2.0,
                "timestep_bias_begin": 100,
                "timestep_bias_end": 300,
                "min_timestep": 200,
            },
            "train.timestep_bias_begin",
        ),  # fmt: skip
        ({"timestep_bias_strategy": "range", "timestep_bias_multiplier": 2.0}, "train.timestep_bias_begin"),  # all
        ({"min_timestep": 500, "max_timestep": 500}, "train.max_timestep"),
        ({"max_timestep": 1001}, "train.max_timestep"),
        ({"multires_noise_discount": 0.5}, "train.multires_noise_discount"),  # no iterations
        ({"input_perturbation": -0.1}, "train.input_perturbation"),
        ({"prediction_type": "sample"}, "train.prediction_type"),
        ({"samples": {"guidance_rescale": 1.5}}, "train.samples.guidance_rescale"),
    ],
)
def test_bad_recipes_name_the_parameter(overrides, name):
    with pytest.raises(ParamError) as caught:
        params(**overrides)
    assert caught.value.name == name
    assert "\n" not in str(caught.value)


def test_valid_recipes_load_and_shape_the_run_identity():
    base = params()
    recipes = [
        dict(
            prediction_type="v_prediction", rescale_betas_zero_snr=True, snr_gamma=None, debiased_estimation_loss=True
        ),
        dict(prediction_type="v_prediction", rescale_betas_zero_snr=True),  # min-SNR in its v form
        dict(loss_type="smooth_l1", huber_schedule="exponential", huber_c=0.3),
        dict(timestep_sampling="logit_normal", logit_mean=0.3, min_timestep=100, max_timestep=900),
        dict(multires_noise_iterations=6, multires_noise_discount=0.4, input_perturbation=0.1),
    ]
    identities = [params(**recipe).identity() for recipe in recipes]
    assert all(identity != base.identity() for identity in identities)
    assert params(samples={"guidance_rescale": 0.7}).identity() == base.identity()  # sampling only


def test_the_schedule_must_have_the_steps_max_timestep_names():
    with pytest.raises(ParamError, match="train.max_timestep"):
        TimestepSampler(params(), 500)


# --- tiny training runs -------------------------------------------------------------------

RUN = dict(
    SCALED,
    learning_rate=1e-3,
    lr_scheduler="constant",
    lr_warmup_steps=0,
    optimizer_args={"weight_decay": 0.01},
    checkpoints={"every_n_steps": 0},
)


@pytest.mark.usefixtures(fresh_process_state.__name__)
@pytest.mark.parametrize(
    "recipe",
    [
        dict(
            prediction_type="v_prediction",
            rescale_betas_zero_snr=True,
            timestep_bias_strategy="later",
            timestep_bias_multiplier=2.0,
            samples={"every_n_steps": SCALED["max_train_steps"], "steps": 2, "guidance_rescale": 0.7},
        ),
        dict(
            timestep_sampling="logit_normal",
            loss_type="huber",
            huber_schedule="snr",
            multires_noise_iterations=4,
            multires_noise_discount=0.5,
            input_perturbation=0.1,
        ),
    ],
    ids=["v_prediction-zero_snr", "logit_normal-huber-multires"],
)
def test_tiny_run_with_the_recipe_trains(tmp_path, monkeypatch, recipe):
    write_twin_posters(tmp_path)
    write_params(tmp_path, **{**RUN, **recipe})
    monkeypatch.chdir(tmp_path)
    p = load_train_params(tmp_path / "params.yaml")
    train(p)

    before = load_file(tmp_path / "models/base/unet/diffusion_pytorch_model.safetensors")
    after = load_file(tmp_path / "models/unet/diffusion_pytorch_model.safetensors")
    assert [k for k in before if torch.equal(before[k], after[k])] == []
    losses = val_losses(tmp_path)
    assert losses[-1] < 0.9 * losses[0], losses

    saved = json.loads((tmp_path / "models/unet" / SCHEDULE_FILE).read_text())
    assert (saved["prediction_type"], saved["rescale_betas_zero_snr"]) == (p.prediction_type, p.rescale_betas_zero_snr)
    assert saved["timestep_spacing"] == ("trailing" if p.rescale_betas_zero_snr else "leading")
    if p.samples.every_n_steps:
        assert list((tmp_path / "dvclive/train/plots/images").rglob("*.png"))
