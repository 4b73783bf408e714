"""Stride schedules: validity for every n, reference values, JSON round trips, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from pipeline.errors import StridelabError
from pipeline.core.noise import make_alphas_cumprod, sigma_at, sigmas_of
from pipeline.core.schedules import (
    SCHEDULES,
    Schedule,
    make_schedule,
    project_to_distinct,
    resolve_schedule,
    validate_timesteps,
)

T = 1000
AC = make_alphas_cumprod("linear", T)
SMALL_T = 50
AC_SMALL = make_alphas_cumprod("linear", SMALL_T, 0.001, 0.2)


TABLES = {"linear": AC, "squaredcos_cap_v2": make_alphas_cumprod("squaredcos_cap_v2", T)}


def _assert_exactly_n_distinct(name: str, ac: torch.Tensor, ns, **kw) -> None:
    Tm = ac.numel()
    for n in ns:
        ts = make_schedule(name, n, ac, **kw).timesteps
        assert len(ts) == n, (name, n)
        assert len(set(ts)) == n, (name, n)
        assert all(a > b for a, b in zip(ts, ts[1:])), (name, n)
        assert 0 <= ts[-1] and ts[0] <= Tm - 1, (name, n)


@pytest.mark.parametrize("table", list(TABLES))
@pytest.mark.parametrize("name", list(SCHEDULES))
def test_every_n_gives_exactly_n_distinct_decreasing_in_range_steps(name, table):
    """The README's "every schedule gives exactly n distinct steps for every n": all n = 1..1000, on a
    linear and a cosine noise table (all schedules, both tables: ~16 s on this machine)."""
    _assert_exactly_n_distinct(name, TABLES[table], range(1, T + 1))


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_every_n_on_a_small_model(name):
    """Collision-heavy regime: every n on a T = 50 model."""
    # AYS's default reference is for T = 1000; give the small model a reference of its own.
    kw = {"reference": [SMALL_T - 1, int(SMALL_T * 0.6), int(SMALL_T * 0.3), int(SMALL_T * 0.1), 0]} if name == "ays" else {}
    _assert_exactly_n_distinct(name, AC_SMALL, range(1, SMALL_T + 1), **kw)


@pytest.mark.parametrize("spacing,name", [("leading", "uniform"), ("linspace", "linspace"), ("trailing", "trailing")])
@pytest.mark.parametrize("n", [1, 7, 10, 50, 333])
def test_uniform_spacings_match_diffusers(spacing, name, n):
    sched = DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=0)
    sched.set_timesteps(n)
    assert list(make_schedule(name, n, AC).timesteps) == sched.timesteps.tolist()


def test_reference_values_from_the_reference_sheet():
    assert make_schedule("linspace", 10, AC).timesteps == (999, 888, 777, 666, 555, 444, 333, 222, 111, 0)
    assert make_schedule("uniform", 10, AC).timesteps == (900, 800, 700, 600, 500, 400, 300, 200, 100, 0)
    assert make_schedule("trailing", 10, AC).timesteps == (999, 899, 799, 699, 599, 499, 399, 299, 199, 99)


def test_quadratic_is_ddim_paper_spacing_without_duplicates():
    # The official DDIM code int-casts and gets 96 unique steps for S = 100; where it has no collisions
    # (small S) we agree with it exactly.
    official10 = sorted({int(s) for s in np.linspace(0, np.sqrt(0.8 * T), 10) ** 2}, reverse=True)
    assert len(official10) == 10
    ours10 = make_schedule("quadratic", 10, AC).timesteps
    assert max(abs(a - b) for a, b in zip(ours10, official10)) <= 1  # round vs floor
    official100 = {int(s) for s in np.linspace(0, np.sqrt(0.8 * T), 100) ** 2}
    assert len(official100) == 96
    assert len(set(make_schedule("quadratic", 100, AC).timesteps)) == 100


def test_karras_sigmas_follow_eq5():
    n, rho = 12, 7.0
    ts = make_schedule("karras", n, AC, rho=rho).timesteps
    sig = sigmas_of(AC)
    smin, smax = sig[0].item(), sig[-1].item()
    ramp = np.linspace(0, 1, n)
    want = (smax ** (1 / rho) + ramp * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    got = sig[list(ts)].numpy()
    # Each integer step is the nearest table entry to the continuous target (within one timestep).
    for g, w, t in zip(got, want, ts):
        lo, hi = sig[max(t - 1, 0)].item(), sig[min(t + 1, T - 1)].item()
        assert lo <= w <= hi or np.isclose(g, w, rtol=1e-9), (t, g, w)


def test_logsnr_is_uniform_in_log_sigma():
    ts = make_schedule("logsnr", 8, AC).timesteps
    ls = sigma_at(torch.tensor(ts, dtype=torch.float64), AC).log().numpy()
    gaps = -np.diff(ls)
    assert gaps.std() / gaps.mean() < 0.05


def test_ays_default_reference_is_diffusers_list_at_ten_steps():
    from diffusers.schedulers import AysSchedules

    ref = tuple(AysSchedules["StableDiffusionTimesteps"])
    assert make_schedule("ays", len(ref), AC).timesteps == ref
    assert make_schedule("ays", 20, AC).nfe == 20


def test_project_to_distinct_only_moves_collisions():
    assert project_to_distinct([9.2, 5.6, 3.1, 0.4], 10) == (9, 6, 3, 0)
    assert project_to_distinct([3.0, 0.2, 0.1, 0.0], 10) == (3, 2, 1, 0)
    assert project_to_distinct([9.9, 9.8, 9.7], 10) == (9, 8, 7)


def test_schedule_json_round_trip_and_sigmas(tmp_path):
    s = make_schedule("karras", 10, AC, rho=5.0)
    s2 = Schedule.from_json(s.to_json())
    assert s2 == s
    p = s.save(tmp_path / "k.json")
    assert Schedule.load(p) == s
    sig = s.sigmas(AC)
    assert sig.shape == (11,) and sig[-1] == 0 and (sig[:-1] > 0).all() and (sig[:-1] > sig[1:]).all()
    assert resolve_schedule(str(p), None, AC) == s


@pytest.mark.parametrize(
    "payload,match",
    [
        ({"timesteps": [5, 7, 3]}, r"timesteps\[1\] = 7 is not decreasing"),
        ({"timesteps": [5, 5, 3]}, r"timesteps\[1\] = 5 is a duplicate"),
        ({"timesteps": [1000, 3]}, r"timesteps\[0\] = 1000 is out of range"),
        ({"timesteps": [5, -1]}, r"timesteps\[1\] = -1 is out of range"),
        ({"timesteps": [5.5, 3]}, r"timesteps\[0\] = 5.5 is not an integer"),
        ({"timesteps": ["9", 3]}, r"timesteps\[0\] = '9' is not an integer"),
        ({"timesteps": [True, 0]}, r"is not an integer"),
        ({"timesteps": []}, "empty"),
        ({"timesteps": 7}, "list of integers"),
        ({"steps": [3, 2]}, "no 'timesteps'"),
        ({"timesteps": [3, 2], "nfe": 3}, "nfe = 3"),
        ({"timesteps": [3, 2], "num_train_timesteps": "x"}, "num_train_timesteps"),
        ([3, 2, 1], "JSON object"),
    ],
)
def test_bad_schedule_files_name_the_bad_value(tmp_path, payload, match):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(payload))
    with pytest.raises(StridelabError, match=match):
        Schedule.load(p)


def test_nan_and_truncated_json_are_refused(tmp_path):
    p = tmp_path / "nan.json"
    p.write_text('{"timesteps": [NaN, 3]}')
    with pytest.raises(StridelabError, match="NaN"):
        Schedule.load(p)
    p.write_text('{"timesteps": [9, 3')
    with pytest.raises(StridelabError, match="invalid schedule JSON"):
        Schedule.load(p)
    with pytest.raises(StridelabError, match="not found"):
        Schedule.load(tmp_path / "missing.json")


@pytest.mark.parametrize("bad_n", [0, -3, T + 1, 2.5, "10", None, True])
def test_bad_nfe_is_refused_by_every_schedule(bad_n):
    for name in SCHEDULES:
        with pytest.raises(StridelabError, match="nfe must be an integer"):
            make_schedule(name, bad_n, AC)


def test_bad_names_and_params_list_the_choices():
    with pytest.raises(StridelabError, match="choose one of uniform, linspace"):
        make_schedule("cosine", 10, AC)
    with pytest.raises(StridelabError, match="bad parameters"):
        make_schedule("karras", 10, AC, rhoo=3)
    with pytest.raises(StridelabError, match="rho must be > 0"):
        make_schedule("karras", 10, AC, rho=-1)
    with pytest.raises(StridelabError, match="needs `nfe`"):
        resolve_schedule("karras", None, AC)


def test_validate_timesteps_accepts_numpy_and_torch_ints():
    assert validate_timesteps(np.array([9, 4, 0]), 10) == (9, 4, 0)
    assert validate_timesteps(torch.tensor([9, 4, 0]), 10) == (9, 4, 0)
    with pytest.raises(StridelabError, match="integers"):
        validate_timesteps(torch.tensor([9.0, 4.0]), 10)
