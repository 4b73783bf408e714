"""Search spaces: every draw is a valid schedule; the warp family contains the classic baselines exactly."""

from __future__ import annotations

import numpy as np
import optuna
import pytest

from pipeline.errors import StridelabError
from pipeline.core.noise import make_alphas_cumprod
from pipeline.core.schedules import SCHEDULES, Schedule, make_schedule
from search.space import SPACES, WarpSpace, make_space

ABAR = make_alphas_cumprod()
ABAR_COS = make_alphas_cumprod("squaredcos_cap_v2")


@pytest.mark.parametrize("space_name", list(SPACES))
@pytest.mark.parametrize("nfe", [2, 5, 10, 37])
def test_random_draws_are_valid_schedules(space_name, nfe):
    space = make_space(space_name, nfe, ABAR)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=nfe))
    for _ in range(40):
        s = space.suggest(study.ask())
        assert isinstance(s, Schedule) and s.nfe == nfe and len(set(s.timesteps)) == nfe
        assert list(s.timesteps) == sorted(s.timesteps, reverse=True)


@pytest.mark.parametrize("space_name", list(SPACES))
def test_extreme_parameters_stay_valid(space_name):
    space = make_space(space_name, 20, ABAR)
    for pick in (0, 1):
        params = {k: (d.low, d.high)[pick] for k, d in space.distributions().items()}
        assert space.build(params).nfe == 20
    params = {k: (d.low if i % 2 else d.high) for i, (k, d) in enumerate(space.distributions().items())}
    assert space.build(params).nfe == 20


@pytest.mark.parametrize("abar", [ABAR, ABAR_COS], ids=["linear", "cosine"])
@pytest.mark.parametrize("name", ["uniform", "linspace", "quadratic", "karras", "logsnr"])
@pytest.mark.parametrize("nfe", [2, 5, 10, 20, 50])
def test_warp_reproduces_classic_schedules_exactly(abar, name, nfe):
    space = WarpSpace(nfe, abar)
    ref = make_schedule(name, nfe, abar)
    got = space.suggest(optuna.trial.FixedTrial(space.params_of(ref)))
    assert got.timesteps == ref.timesteps


@pytest.mark.parametrize("nfe", [10, 20, 50])
def test_warp_moves_the_last_step_and_contains_trailing(nfe):
    space = WarpSpace(nfe, ABAR)
    ref = make_schedule("trailing", nfe, ABAR)  # ends at T / nfe - 1: needs t_min_frac > 0
    params = space.params_of(ref)
    assert params["t_min_frac"] > 0 and space.build(params).timesteps == ref.timesteps
    base = space.params_of(make_schedule("uniform", nfe, ABAR))
    assert space.build({**base, "t_min_frac": 0.04}).timesteps[-1] == 40


def test_warp_special_case_parameters():
    space = WarpSpace(10, ABAR)
    assert space.params_of(make_schedule("karras", 10, ABAR))["sigma_power"] == pytest.approx(1 / 7)
    assert space.params_of(make_schedule("quadratic", 10, ABAR))["time_power"] == 2.0
    assert space.params_of(make_schedule("logsnr", 10, ABAR))["sigma_power"] == 0.0


def test_warp_fits_a_non_member_closely():
    space = WarpSpace(10, ABAR)
    ref = make_schedule("time_quadratic", 10, ABAR)
    got = space.build(space.params_of(ref))
    assert np.abs(np.array(got.timesteps) - np.array(ref.timesteps)).max() <= 25


@pytest.mark.parametrize("space_name", ["free", "free_t"])
@pytest.mark.parametrize("nfe", [2, 5, 10, 20])
@pytest.mark.parametrize("name", list(SCHEDULES))
def test_free_placement_reproduces_every_baseline(space_name, nfe, name):
    space = make_space(space_name, nfe, ABAR)
    ref = make_schedule(name, nfe, ABAR)
    got = space.suggest(optuna.trial.FixedTrial(space.params_of(ref)))
    assert got.timesteps == ref.timesteps


def test_params_are_inside_the_distributions():
    for space_name in SPACES:
        space = make_space(space_name, 10, ABAR)
        dists = space.distributions()
        for name in SCHEDULES:
            for k, v in space.params_of(make_schedule(name, 10, ABAR)).items():
                assert dists[k].low <= v <= dists[k].high, (space_name, name, k, v)


def test_unknown_space_and_mismatched_schedule():
    with pytest.raises(StridelabError, match="choose one of"):
        make_space("nope", 10, ABAR)
    with pytest.raises(StridelabError, match="nfe"):
        make_space("warp", 10, ABAR).params_of(make_schedule("uniform", 5, ABAR))
