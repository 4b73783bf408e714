"""Transfer table (`pipeline.evaluation.transfer`, `stridelab evaluate --samplers`): every sampler runs on the model's
own noise table at equal model evaluations from the same x_T, and the numbers agree with what is known.

Measured on gmm:ring8 (128 seeds, 1000-step DDIM teacher), recon vs the teacher at a budget of N model
evaluations, every sampler on the named spacing at its own step count (Heun: (N + 1) // 2 steps):

==================================  =======  ==============  =======  ======
spacing, N                          DDIM     DPM-Solver++2M  Euler    Heun
==================================  =======  ==============  =======  ======
logSNR-even, 10                     2.1e-3   1.2e-3          2.1e-3   0.23
logSNR-even, 20                     4.0e-4   3.0e-5          4.0e-4   1.3e-3
even in t, trailing (999 .. 99), 10  3.8e-3   3.1e-3          3.8e-3   9.8e-3
even in t, trailing (999 .. 49), 20  3.9e-4   5.9e-4          3.9e-4   1.5e-3
even in t, leading (900 .. 0), 10   3.7e-3   0.059           3.7e-3   0.019
even in t, leading (950 .. 0), 20   3.2e-4   0.012           3.2e-4   2.1e-3
==================================  =======  ==============  =======  ======

What holds, and why (only this is asserted):
- Euler on the probability-flow ODE in sigma *is* DDIM (eta = 0) on the same steps: equal to float32.
- DPM-Solver++(2M) beats DDIM at equal NFE where its steps are even in logSNR (lambda), the variable its
  second-order multistep formula is built on. On steps even in t it is not reliably better (0.8x at
  N = 10, 1.5x at N = 20), and on lists that end at t = 0 it is much worse: the last lambda step
  (t 100 -> 0: h = 3.5 after 0.75) makes its extrapolation from the previous x0 prediction overshoot.
- Heun does not beat DDIM at equal NFE on ring8 on these spacings: it gets half the steps, and its
  corrector evaluates the stiff eps of ring8's sharp modes (std 0.1) after each big step; with 5 steps on
  logSNR-even spacing (ending at sigma = 0.01) that costs 100x. Not a law: on other lists it can win
  (trailing 999 .. 99 log-sigma interpolated to 5 steps: 1.6e-3 vs DDIM's 2.8e-3 on 64 seeds).
"""

from __future__ import annotations

import csv
import dataclasses

import pytest
import torch

from jobs.cli import main
from pipeline.errors import StridelabError
from pipeline.evaluation.inprocess import evaluate_schedule, make_teacher
from pipeline.interop.apply import model_evaluations
from pipeline.models.load import load_model
from pipeline.core.schedules import Schedule, make_schedule
from pipeline.evaluation.transfer import (
    SAMPLER_NAMES,
    run_sampler,
    scheduler_for,
    steps_for_budget,
    transfer_table,
)

MODEL = load_model("gmm:ring8")
AC = MODEL.alphas_cumprod
SEEDS = range(64)


@pytest.fixture(scope="module")
def teacher():
    return make_teacher(MODEL, SEEDS)  # all 1000 steps: a 200-step teacher shifts the N = 10 ratios by ~0.2


class _Counting(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x, t):
        self.calls += 1
        return self.inner(x, t)


def _row(rows, sampler, spacing):
    (r,) = [r for r in rows if r["sampler"] == sampler and r["spacing"] == spacing]
    return r


# A non-uniform "learned" schedule as an export would carry it (with the model's table fingerprint).
LEARNED = Schedule((999, 880, 700, 520, 360, 220, 120, 55, 18, 3), 1000, "learned")


def test_every_sampler_runs_and_the_table_has_every_row(teacher):
    rows = transfer_table(MODEL, teacher, LEARNED)
    assert [(r["sampler"], r["spacing"]) for r in rows] == [
        (s, k) for s in SAMPLER_NAMES for k in ("learned", "default")]
    for r in rows:
        assert r["recon"] > 0 and torch.isfinite(torch.tensor(r["recon"])), r
        assert r["nfe"] == 10 and r["evals"] <= 10
    # Equal NFE in model evaluations: Heun's 5 steps cost 2 * 5 - 1 = 9; the learned list is interpolated.
    assert [(_row(rows, s, "learned")["steps"], _row(rows, s, "learned")["evals"]) for s in SAMPLER_NAMES] == [
        (10, 10), (10, 10), (10, 10), (5, 9)]
    assert _row(rows, "heun", "learned")["how"] == "log-sigma interpolated 10->5 steps"
    assert _row(rows, "heun", "learned")["timesteps"].split()[0] == "999"
    assert _row(rows, "ddim", "learned")["timesteps"] == " ".join(map(str, LEARNED.timesteps))
    # Default spacings are the schedulers' own set_timesteps(n).
    assert _row(rows, "ddim", "default")["timesteps"] == "900 800 700 600 500 400 300 200 100 0"
    assert _row(rows, "dpmsolver++2m", "default")["timesteps"] == "999 899 799 699 599 500 400 300 200 100"
    assert _row(rows, "euler", "default")["timesteps"] == "999 888 777 666 555 444 333 222 111 0"
    assert _row(rows, "heun", "default")["timesteps"] == "999 749.25 499.50 249.75 0"
    assert _row(rows, "heun", "default")["t_rounded"] == 3


@pytest.mark.parametrize("name", SAMPLER_NAMES)
@pytest.mark.parametrize("steps", [LEARNED, 6])
def test_evals_are_the_network_calls(name, steps, teacher):
    counting = _Counting(MODEL.denoiser)
    model = dataclasses.replace(MODEL, denoiser=counting)
    _, ts, evals = run_sampler(name, model, teacher.x_T[:4], steps)
    n = len(ts)
    assert evals == counting.calls == model_evaluations(scheduler_for(name, AC), n)


def test_ddim_learned_row_is_the_evaluation_recon(teacher):
    rows = transfer_table(MODEL, teacher, LEARNED, samplers=["ddim"])
    assert _row(rows, "ddim", "learned")["recon"] == evaluate_schedule(MODEL, LEARNED, teacher)["recon"]


def test_euler_is_ddim_on_the_same_steps(teacher):
    rows = transfer_table(MODEL, teacher, LEARNED, samplers=["ddim", "euler"])
    a, b = _row(rows, "ddim", "learned")["recon"], _row(rows, "euler", "learned")["recon"]
    assert abs(a - b) <= 1e-4 * a, (a, b)


def test_higher_order_at_equal_nfe_what_holds(teacher):
    """See the module docstring for the measured table and the reasons."""
    for n in (10, 20):
        rows = transfer_table(MODEL, teacher, lambda m: make_schedule("logsnr", m, AC), nfe=n, label="logsnr")
        ddim, dpm, heun = (_row(rows, s, "learned")["recon"] for s in ("ddim", "dpmsolver++2m", "heun"))
        assert dpm < (0.75 if n == 10 else 0.2) * ddim, (n, ddim, dpm)  # 64 seeds: 0.63x (N = 10), 0.07x (N = 20)
        assert heun > ddim, (n, ddim, heun)  # half the steps, stiff eps near sigma = 0.01
    leading = transfer_table(MODEL, teacher, make_schedule("uniform", 10, AC), samplers=["ddim", "dpmsolver++2m"])
    assert _row(leading, "dpmsolver++2m", "learned")["recon"] > 5 * _row(leading, "ddim", "learned")["recon"]


def test_schedulers_run_the_models_table_not_their_class_default():
    from diffusers import HeunDiscreteScheduler

    for name in SAMPLER_NAMES:
        own = scheduler_for(name, AC).alphas_cumprod.double()
        assert ((own - AC) / AC).abs().max() < 1e-6, name
    assert ((HeunDiscreteScheduler().alphas_cumprod.double() - AC).abs().max()) > 1e-2
    assert steps_for_budget("heun", 10, AC) == 5 and steps_for_budget("heun", 11, AC) == 6
    assert steps_for_budget("dpmsolver++2m", 7, AC) == 7
    with pytest.raises(StridelabError, match="unknown sampler 'plms'; choose from ddim, dpmsolver"):
        scheduler_for("plms", AC)
    with pytest.raises(StridelabError, match="T = 500"):
        transfer_table(MODEL, make_teacher(MODEL, [0], nfe=10), Schedule((400, 100), 500))


def test_cli_transfer_table(tmp_path, capsys):
    js = tmp_path / "learned.json"
    LEARNED.save(js)
    out = tmp_path / "t.csv"
    argv = ["evaluate", "--model", "gmm:ring8", "--solvers", "ddim,dpmsolver++2m,euler,heun", "--schedules", str(js),
            "--num-seeds", "16", "--teacher-nfe", "100", "--out", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "equal NFE = equal model evaluations" in text and "heun" in text
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and {r["sampler"] for r in rows} == set(SAMPLER_NAMES)
    assert rows[0]["schedule"] == str(js) and rows[0]["vs_default"] and not rows[1]["vs_default"]
    assert [int(r["evals"]) for r in rows] == [10] * 6 + [9, 9]
    # --nfe is a budget of model evaluations; a name works too.
    assert main(["evaluate", "--model", "gmm:ring8", "--solvers", "heun", "--schedules", "karras", "--nfe", "7",
                 "--num-seeds", "8", "--teacher-nfe", "50"]) == 0
    text = capsys.readouterr().out
    assert "as is" in text and "set_timesteps(4)" in text  # karras built at Heun's 4 steps (7 evaluations)


@pytest.mark.parametrize("extra, needle", [
    (["--solvers", "ddim,plms"], "unknown sampler 'plms'"),
    (["--solvers", "ddim", "--schedules", "uniform,karras", "--nfe", "5"], "one schedule"),
    (["--solvers", "ddim", "--schedules", "karras"], "needs --nfe"),
    (["--solvers", "ddim", "--schedules", "karras", "--nfe", "5", "--actors", "2"], "drop --actors"),
])
def test_cli_transfer_errors(extra, needle, capsys):
    assert main(["evaluate", "--model", "gmm:ring8", "--num-seeds", "4", *extra]) == 2
    assert needle in capsys.readouterr().err
