"""Which timestep each training sample is noised to.

Every strategy draws from ``min_timestep … max_timestep - 1`` (kohya-ss's bounds):

- ``uniform``: every step alike, one ``torch.randint`` draw per sample, as before these knobs.
- ``logit_normal`` (SD3, SimpleTuner): t = sigmoid(x) with x ~ N(logit_mean, logit_std), scaled
  to the range; the mass of each step is the logit-normal probability of its 1/n-wide slice.
- a bias (the diffusers SDXL example's ``timestep_bias_*``): the probability of the biased
  steps is multiplied by ``timestep_bias_multiplier``: the first (``earlier``) or last
  (``later``) ``timestep_bias_portion`` of the range, or the steps ``begin … end - 1`` (``range``).

Any strategy other than plain uniform becomes a table of probabilities, drawn from by
inverting its cumulative sum with one uniform number, so one sample still takes its
timestep from its own seeded generator.
"""

from __future__ import annotations

import torch

from postertune.params import ParamError
from postertune.train.params import TrainParams


def timestep_weights(params: TrainParams, num_train_timesteps: int) -> torch.Tensor | None:
    """Relative probability of each of the schedule's steps (0 outside the range); ``None``
    for the plain uniform draw."""
    low, high = params.min_timestep, params.max_timestep
    if high > num_train_timesteps:
        raise ParamError("train.max_timestep", f"must be at most the schedule's {num_train_timesteps} steps")
    if params.timestep_sampling == "uniform" and params.timestep_bias_strategy == "none":
        return None
    count = high - low
    weights = torch.zeros(num_train_timesteps, dtype=torch.float64)
    if params.timestep_sampling == "logit_normal":
        edges = torch.logit(torch.arange(count + 1, dtype=torch.float64) / count)  # -inf … inf
        cdf = torch.special.ndtr((edges - params.logit_mean) / params.logit_std)
        weights[low:high] = cdf[1:] - cdf[:-1]
    else:
        weights[low:high] = 1.0
    biased = _biased_steps(params, count)
    if biased is not None:
        weights[biased] *= params.timestep_bias_multiplier
    return weights


def _biased_steps(params: TrainParams, count: int) -> slice | None:
    strategy, low = params.timestep_bias_strategy, params.min_timestep
    if strategy == "range":
        return slice(params.timestep_bias_begin, params.timestep_bias_end)
    portion = min(count, max(1, round(params.timestep_bias_portion * count)))
    if strategy == "earlier":
        return slice(low, low + portion)
    if strategy == "later":
        return slice(params.max_timestep - portion, params.max_timestep)
    return None


class TimestepSampler:
    def __init__(self, params: TrainParams, num_train_timesteps: int):
        self.low, self.high = params.min_timestep, params.max_timestep
        weights = timestep_weights(params, num_train_timesteps)
        self.cdf = None
        if weights is not None:
            running = weights.cumsum(0)
            self.cdf = running / running[-1]  # ends at exactly 1, so a draw below 1 never lands past the range

    def draw(self, generator: torch.Generator) -> torch.Tensor:
        """One timestep, a 0-d long tensor, from ``generator``."""
        if self.cdf is None:
            return torch.randint(self.low, self.high, (), generator=generator)
        u = torch.rand((), generator=generator, dtype=torch.float64)
        return torch.searchsorted(self.cdf, u, right=True)
