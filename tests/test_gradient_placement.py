"""Gradient step placement (LD3-style): the continuous DDIM student, its gradient, the Adam loop, the projection
to integer timesteps and the data-parallel gradient on Ray actors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from pipeline.core.schedules import uniform, validate_timesteps
from pipeline.errors import StridelabError
from pipeline.evaluation.gradient import (DIFFERENTIABLE, differentiable, dpmpp_2m_continuous, params_from_timesteps,
                                          project_to_ball, shard_loss_and_grad, times_from_params)
from pipeline.models.load import load_model
from pipeline.solvers.ddim import ddim_sample
from pipeline.solvers.dpmsolver import dpmpp_2m_sample
from pipeline.solvers.registry import get_solver
from search.placement.gradient import GradientConfig, gradient_placement, local_grad_fn, project_schedule

GMM = "gmm:ring8"
SEEDS = list(range(8))
TEACHER_NFE = 50


@pytest.fixture(scope="module")
def gmm():
    return load_model(GMM)


@pytest.fixture(scope="module")
def grad_fn(gmm):
    return local_grad_fn(gmm, SEEDS, TEACHER_NFE, dtype=torch.float64)


@pytest.mark.parametrize("solver", list(DIFFERENTIABLE))
def test_integer_steps_reproduce_solver(gmm, solver):
    # At integer timesteps each continuous student is exactly the solver the sweep runs (the 3M's orders
    # 1, 2, 3, 3, 2, 1 all occur with six steps).
    ts = [700, 420, 200, 90, 30, 8]
    theta = params_from_timesteps(ts, gmm.alphas_cumprod)
    t_frac, abar = times_from_params(theta, gmm.alphas_cumprod)
    assert torch.allclose(t_frac, torch.tensor(ts, dtype=torch.float64), atol=1e-9)
    x_T = torch.randn(6, *gmm.sample_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ref = get_solver(solver).sample(gmm.denoiser, x_T, ts, gmm.alphas_cumprod)
    out = differentiable(solver)(gmm.denoiser, x_T, t_frac, abar)
    assert torch.allclose(out, ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("spec", [GMM, "bundled:digits"])
def test_continuous_inversion_reproduces_ddim_invert(spec):
    # At integer steps the inversion twin is `ddim_invert` exactly (the analytic mixture and the real UNet, float64),
    # and a shift of the encoder's model label reaches the code through autograd.
    from pipeline.core.noise import model_levels
    from pipeline.evaluation.gradient import ddim_invert_continuous
    from pipeline.solvers.ddim import ddim_invert

    m = load_model(spec)
    m.denoiser.double()
    ts = [900, 600, 350, 150, 40]
    ac = m.alphas_cumprod.to(torch.float64)
    x0 = 0.5 * torch.randn(3, *m.sample_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ref = ddim_invert(m.denoiser, x0, ts, m.alphas_cumprod)
    up = torch.tensor(ts[::-1], dtype=torch.float64)
    out = ddim_invert_continuous(m.denoiser, x0, up, ac[up.long()])
    assert ref.abs().max() > 0.1 and torch.allclose(out, ref, rtol=0, atol=1e-9)
    shift = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    code = ddim_invert_continuous(m.denoiser, x0, up, ac[up.long()], model_at=model_levels(ac[up.long()], shift, ac))
    assert torch.allclose(code, ref, rtol=0, atol=1e-6)  # zero shift: the same levels, up to the sigma round trip
    code.square().sum().backward()
    assert torch.isfinite(shift.grad).all() and shift.grad.abs().max() > 0


def test_continuous_2m_reproduces_2m_on_bundled_network():
    # The same on a real diffusers UNet (the bundled digits model, float64): the network sees the
    # fractional timestep as a float, which at integer values must embed exactly as the integer one.
    m = load_model("bundled:digits")
    m.denoiser.double()
    ts = [900, 600, 350, 150, 40]
    t_frac, abar = times_from_params(params_from_timesteps(ts, m.alphas_cumprod), m.alphas_cumprod)
    x_T = torch.randn(2, *m.sample_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    ref = dpmpp_2m_sample(m.denoiser, x_T, ts, m.alphas_cumprod)
    assert ref.abs().max() > 0.1  # a real image, not a degenerate zero
    assert torch.allclose(dpmpp_2m_continuous(m.denoiser, x_T, t_frac, abar), ref, rtol=0, atol=1e-9)


def test_unknown_student_lists_the_differentiable_solvers(gmm):
    with pytest.raises(StridelabError, match="`solver` must be one of ddim, dpmsolver\\+\\+2m, dpmsolver\\+\\+3m for "
                                             "gradient placement .*, got 'unipc'"):
        local_grad_fn(gmm, SEEDS, TEACHER_NFE, solver="unipc")


def test_any_logits_give_decreasing_steps_in_range(gmm):
    theta = torch.randn(11, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 4
    t_frac, _ = times_from_params(theta, gmm.alphas_cumprod)
    assert (t_frac[1:] < t_frac[:-1]).all() and t_frac.min() >= 0 and t_frac.max() <= 999


@pytest.mark.parametrize("solver", list(DIFFERENTIABLE))
@pytest.mark.parametrize("with_delta", [False, True])
def test_gradient_matches_finite_differences(gmm, with_delta, solver):
    x_T = torch.randn(4, *gmm.sample_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x0 = ddim_sample(gmm.denoiser, x_T, uniform(100, gmm.alphas_cumprod).timesteps, gmm.alphas_cumprod)
    theta = params_from_timesteps([800, 500, 250, 100, 20], gmm.alphas_cumprod)
    delta = 0.05 * torch.randn_like(x_T) if with_delta else None
    loss, g, g_delta = shard_loss_and_grad(gmm.denoiser, x_T, x0, theta, gmm.alphas_cumprod, delta=delta, solver=solver)
    h = 1e-6
    for k in range(theta.numel()):
        e = torch.zeros_like(theta)
        e[k] = h
        lp = shard_loss_and_grad(gmm.denoiser, x_T, x0, theta + e, gmm.alphas_cumprod, delta=delta, solver=solver)[0]
        lm = shard_loss_and_grad(gmm.denoiser, x_T, x0, theta - e, gmm.alphas_cumprod, delta=delta, solver=solver)[0]
        assert g[k].item() == pytest.approx((lp - lm) / (2 * h), rel=1e-5, abs=1e-9)
    if with_delta:
        e = torch.zeros_like(delta)
        e[2, 1] = h
        lp = shard_loss_and_grad(gmm.denoiser, x_T, x0, theta, gmm.alphas_cumprod, delta=delta + e, solver=solver)[0]
        lm = shard_loss_and_grad(gmm.denoiser, x_T, x0, theta, gmm.alphas_cumprod, delta=delta - e, solver=solver)[0]
        assert g_delta[2, 1].item() == pytest.approx((lp - lm) / (2 * h), rel=1e-5, abs=1e-9)
    else:
        assert g_delta is None
    assert loss > 0


@pytest.mark.parametrize("solver, radius", [("ddim", 0.0), ("ddim", 0.1), ("dpmsolver++2m", 0.0)])
def test_loss_decreases(gmm, grad_fn, solver, radius):
    fn = grad_fn if solver == "ddim" else local_grad_fn(gmm, SEEDS, TEACHER_NFE, dtype=torch.float64, solver=solver)
    res = gradient_placement(fn, 5, gmm.alphas_cumprod, GradientConfig(iters=15, lr=0.05, slack_radius=radius),
                             num_seeds=len(SEEDS), sample_shape=gmm.sample_shape)
    assert len(res.losses) == 16 and len(res.timesteps) == 16
    assert res.losses[-1] < 0.5 * res.losses[0]
    assert res.schedule.name == "gradient" and res.schedule.nfe == 5


def test_slack_keeps_offsets_in_ball():
    d = torch.randn(5, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    p = project_to_ball(d, 0.1)
    assert (p.flatten(1).norm(dim=1) <= 0.1 * 4 + 1e-6).all()
    small = 1e-3 * d
    assert torch.equal(project_to_ball(small, 0.1), small)  # inside: untouched
    with pytest.raises(StridelabError, match="radius"):
        project_to_ball(d, -1.0)


def test_projection_gives_distinct_integers(gmm):
    # Logits that crowd every step against t = 0 still project to n distinct, strictly decreasing integers.
    theta = torch.tensor([5.0] + [-30.0] * 9 + [-30.0], dtype=torch.float64)
    s = project_schedule(theta, gmm.alphas_cumprod)
    assert validate_timesteps(s.timesteps, 1000) == s.timesteps and len(set(s.timesteps)) == 10
    sig = s.meta["continuous_sigmas"]
    # (the exact sigmas are that crowded: equal to float precision, hence >=)
    assert len(sig) == 11 and sig[-1] == 0.0 and all(a >= b for a, b in zip(sig, sig[1:]))
    # A placement already on the grid is kept as is.
    ts = (900, 600, 300, 100, 10)
    assert project_schedule(params_from_timesteps(ts, gmm.alphas_cumprod), gmm.alphas_cumprod).timesteps == ts


@pytest.mark.parametrize("bad", [dict(iters=0), dict(slack_radius=-0.1), dict(lr=0.0), dict(loss="l1"),
                                 dict(lr_decay="step")])
def test_config_rejects_bad_values(bad):
    with pytest.raises(StridelabError):
        GradientConfig(**bad)


@pytest.mark.parametrize("decay", ["cosine", "constant"])
def test_learning_rate_decay(gmm, decay):
    # Under a constant gradient every Adam step moves each parameter by exactly the step's learning rate, so the
    # moves read back the schedule: lr (1 + cos(pi k / iters)) / 2 annealed to ~0, or lr throughout.
    iters, lr = 20, 0.1

    def fn(theta, delta):  # loss sum(theta): gradient 1 everywhere
        fn.seen.append(theta.clone())
        return float(theta.sum()), torch.ones_like(theta), None

    fn.seen = []
    gradient_placement(fn, 5, gmm.alphas_cumprod, GradientConfig(iters=iters, lr=lr, lr_decay=decay), num_seeds=1,
                       init=[800, 500, 250, 100, 20])
    moves = [(a - b).abs().max().item() for a, b in zip(fn.seen, fn.seen[1:])]
    want = [lr * (0.5 * (1 + math.cos(math.pi * k / iters)) if decay == "cosine" else 1.0) for k in range(iters)]
    assert moves == pytest.approx(want, rel=1e-5, abs=1e-9)


def test_kept_iterate_is_the_lowest_loss(gmm):
    # Too large a constant rate on a bowl overshoots and oscillates: the kept iterate is the lowest loss seen
    # (and its schedule), not the last.
    init = [800, 500, 250, 100, 20]
    target = params_from_timesteps([700, 450, 200, 80, 10], gmm.alphas_cumprod)

    def fn(theta, delta):
        fn.seen.append(theta.clone())
        d = theta - target
        return float((d * d).sum()), 2 * d, None

    fn.seen = []
    res = gradient_placement(fn, 5, gmm.alphas_cumprod, GradientConfig(iters=40, lr=0.5, lr_decay="constant"),
                             num_seeds=1, init=init)
    b = res.best_iteration
    assert 0 < b < 40 and res.losses[b] == min(res.losses) < res.losses[-1]
    assert torch.equal(res.theta, fn.seen[b])
    assert res.schedule.meta["final_loss"] == res.losses[b] and res.schedule.meta["best_iteration"] == b
    assert res.schedule.timesteps == project_schedule(fn.seen[b], gmm.alphas_cumprod).timesteps


def test_kept_iterate_is_the_start_when_nothing_improves(gmm):
    # A loss that only grows away from the start: the result is the starting schedule, never a worse one.
    init = [800, 500, 250, 100, 20]
    start = params_from_timesteps(init, gmm.alphas_cumprod)

    def fn(theta, delta):  # ascent direction as the gradient: every Adam step moves uphill
        d = theta - start
        return float((d * d).sum()), -(d + 1e-3), None

    fn.time_shift = False
    res = gradient_placement(fn, 5, gmm.alphas_cumprod, GradientConfig(iters=5), num_seeds=1, init=init)
    assert res.best_iteration == 0 and res.losses[0] < min(res.losses[1:])
    assert list(res.schedule.timesteps) == init


def test_pool_gradient_equals_in_process(ray_local, gmm, grad_fn):
    from pipeline.distributed.pool import SamplerPool

    theta = params_from_timesteps([850, 600, 330, 140, 25], gmm.alphas_cumprod)
    delta = 0.03 * torch.randn(len(SEEDS), *gmm.sample_shape, dtype=torch.float64,
                               generator=torch.Generator().manual_seed(2))
    fns = {"ddim": grad_fn, "dpmsolver++2m": local_grad_fn(gmm, SEEDS, TEACHER_NFE, torch.float64, "dpmsolver++2m")}
    with SamplerPool(GMM, SEEDS, TEACHER_NFE, actors=2, num_cpus=0.5) as pool:
        assert pool.actors == 2
        for solver, fn in fns.items():  # one pool for both students: its actors' teachers are the same
            loss, g, gd = fn(theta, delta)
            ploss, pg, pgd = pool.gradient(theta, delta, dtype="float64", solver=solver)
            assert ploss == pytest.approx(loss, rel=1e-12)
            assert torch.allclose(pg, g, rtol=1e-10, atol=1e-14)
            assert torch.allclose(pgd, gd, rtol=1e-10, atol=1e-14)
    # the two students differ (the solver reached the actors)
    assert not torch.allclose(fns["ddim"](theta, delta)[1], fns["dpmsolver++2m"](theta, delta)[1])


def test_batch_rows_are_balanced_over_strata_and_cover_each_epoch():
    from search.placement.gradient import batch_rows

    strata = [(0, 12), (12, 24), (24, 30)]  # two actors' shards of 12 seeds and one of 6
    it = batch_rows(strata, 10, seed=3)
    epoch = [next(it) for _ in range(3)]  # shares 4, 4, 2: three batches use up the 12-seed shards
    for b in epoch:
        assert torch.equal(b, torch.sort(b).values) and len(set(b.tolist())) == 10
        assert [int(((b >= lo) & (b < hi)).sum()) for lo, hi in strata] == [4, 4, 2]
    seen = torch.cat(epoch).tolist()
    assert sorted(v for v in seen if v < 24) == list(range(24))  # each row of the full shards once per epoch
    assert len(set(seen)) == len(seen)
    again = batch_rows(strata, 10, seed=3)
    assert all(torch.equal(next(again), b) for b in epoch)  # deterministic in the seed
    assert not all(torch.equal(a, b) for a, b in zip(epoch, [next(batch_rows(strata, 10, seed=4)) for _ in range(3)]))
    with pytest.raises(StridelabError, match="batch_seeds"):
        next(batch_rows(strata, 31))


def test_grouped_batch_rows_come_from_one_pool_each_in_proportion():
    from search.placement.gradient import batch_rows

    # the sweep's layout: a screen pool of 16 rows and a rest pool of 48, two actors each
    strata, groups = [(0, 8), (8, 16), (16, 40), (40, 64)], [(0, 16), (16, 64)]
    it = batch_rows(strata, 16, seed=0, groups=groups)
    cycle = [next(it) for _ in range(4)]  # weights 16 : 48, so one screen batch per three rest batches
    pools = []
    for b in cycle:
        assert len(set(b.tolist())) == 16
        per_stratum = [int(((b >= lo) & (b < hi)).sum()) for lo, hi in strata]
        in_screen = sum(per_stratum[:2])
        assert in_screen in (0, 16)  # never split over the two pools
        pools.append("screen" if in_screen else "rest")
        assert per_stratum in ([8, 8, 0, 0], [0, 0, 8, 8])  # the pool's actors share it evenly
    assert pools.count("screen") == 1 and pools.count("rest") == 3
    assert sorted(torch.cat(cycle).tolist()) == list(range(64))  # each row once per cycle
    # a pool smaller than a batch joins its neighbour; without groups it is the proportional rule unchanged
    small = batch_rows([(0, 4), (4, 20), (20, 36)], 16, seed=1, groups=[(0, 4), (4, 20), (20, 36)])
    assert [int(((b < 20)).sum()) for b in [next(small) for _ in range(9)]].count(16) == 5
    plain, single = batch_rows(strata, 16, seed=2), batch_rows(strata, 16, seed=2, groups=[(0, 64)])
    assert all(torch.equal(next(plain), next(single)) for _ in range(6))
    with pytest.raises(StridelabError, match="partition"):
        next(batch_rows(strata, 16, groups=[(0, 12), (12, 64)]))


def test_a_batch_is_the_gradient_of_its_seeds(gmm, grad_fn):
    # rows of the full seed list give exactly what a grad function over those seeds alone gives (same teacher)
    theta = params_from_timesteps([850, 600, 330, 140, 25], gmm.alphas_cumprod)
    rows = torch.tensor([1, 4, 6])
    delta = 0.03 * torch.randn(3, *gmm.sample_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    loss, g, gd = grad_fn(theta, delta, rows=rows)
    want = local_grad_fn(gmm, [SEEDS[i] for i in rows], TEACHER_NFE, dtype=torch.float64)(theta, delta)
    assert loss == pytest.approx(want[0], rel=1e-12)
    assert torch.allclose(g, want[1], rtol=1e-10, atol=1e-14) and torch.allclose(gd, want[2], rtol=1e-10, atol=1e-14)


def test_mini_batches_step_on_their_mean_and_keep_the_best_all_seed_iterate(gmm):
    # Seed b's loss is (theta - c_b)^2 summed: a batch's mean gradient is 2 (theta - mean of its c_b). Every
    # full_every-th step and the last see all seeds; only they can be kept.
    n_seeds, iters, every = 8, 12, 5
    init = [800, 500, 250, 100, 20]
    start = params_from_timesteps(init, gmm.alphas_cumprod)
    centres = start + 0.3 * torch.arange(n_seeds, dtype=torch.float64)[:, None] / n_seeds

    def fn(theta, delta, rows=None):
        fn.calls.append(None if rows is None else rows.tolist())
        c = centres if rows is None else centres[rows]
        d = theta[None] - c
        return float((d * d).sum()), 2 * d.sum(0), None

    fn.calls = []
    fn.strata = [(0, 4), (4, 8)]
    res = gradient_placement(fn, 5, gmm.alphas_cumprod,
                             GradientConfig(iters=iters, lr=0.01, batch_seeds=4, full_every=every), num_seeds=n_seeds,
                             init=init)
    full = [0, 5, 10, 12]
    assert res.full_iterations == tuple(full) and [i for i, c in enumerate(fn.calls) if c is None] == full
    for i, rows in enumerate(fn.calls):
        if rows is not None:  # two rows from each actor's shard
            assert len(rows) == 4 and sum(r < 4 for r in rows) == 2
    assert res.best_iteration in full and res.losses[res.best_iteration] == min(res.losses[i] for i in full)
    assert res.schedule.meta["batch_seeds"] == 4
    # a batch as large as the seeds is the full-batch run
    whole = gradient_placement(fn, 5, gmm.alphas_cumprod, GradientConfig(iters=iters, lr=0.01, batch_seeds=8),
                               num_seeds=n_seeds, init=init)
    plain = gradient_placement(fn, 5, gmm.alphas_cumprod, GradientConfig(iters=iters, lr=0.01), num_seeds=n_seeds,
                               init=init)
    assert whole.losses == plain.losses and whole.full_iterations == tuple(range(iters + 1))


@pytest.mark.parametrize("field, value", [("batch_seeds", -1), ("full_every", 0), ("batch_seed", 1.5)])
def test_batch_settings_are_validated(field, value):
    with pytest.raises(StridelabError, match=f"`{field}` must be an integer"):
        GradientConfig(**{field: value})


def test_pool_mini_batch_gradient_equals_in_process(ray_local, gmm, grad_fn):
    # rows across two pools (a sweep's screen and rest) and their actors: each actor gets the rows of its shard
    from pipeline.distributed.pool import SamplerPool
    from search.placement.gradient import pool_grad_fn

    theta = params_from_timesteps([850, 600, 330, 140, 25], gmm.alphas_cumprod)
    rows = torch.tensor([0, 2, 5, 6, 7])
    delta = 0.03 * torch.randn(len(rows), *gmm.sample_shape, dtype=torch.float64,
                               generator=torch.Generator().manual_seed(5))
    loss, g, gd = grad_fn(theta, delta, rows=rows)
    with SamplerPool(GMM, SEEDS[:3], TEACHER_NFE, actors=1, num_cpus=0.5) as screen, \
            SamplerPool(GMM, SEEDS[3:], TEACHER_NFE, actors=2, num_cpus=0.5) as rest:
        fn = pool_grad_fn([screen, rest], dtype="float64")
        assert fn.strata == [(0, 3), (3, 5), (5, 8)]  # shard_bounds: the larger shard last
        assert fn.groups == [(0, 3), (3, 8)]  # each mini-batch from one pool (batch_rows)
        ploss, pg, pgd = fn(theta, delta, rows=rows)
        only_rest = fn(theta, delta[2:], rows=rows[2:])  # the screen's actor has no rows: it is not called
    assert ploss == pytest.approx(loss, rel=1e-12)
    assert torch.allclose(pg, g, rtol=1e-10, atol=1e-14) and torch.allclose(pgd, gd, rtol=1e-10, atol=1e-14)
    want = grad_fn(theta, delta[2:], rows=rows[2:])
    assert only_rest[0] == pytest.approx(want[0], rel=1e-12) and torch.allclose(only_rest[1], want[1], rtol=1e-10)


def test_sweep_cli_gradient_end_to_end(tmp_path, capsys):
    import optuna

    from jobs.cli import main

    out = tmp_path / "sweep"
    assert main(["sweep", "--model", GMM, "--nfe", "4", "--method", "gradient", "--grad-iters", "5",
                 "--slack-radius", "0.05", "--trials", "11", "--num-seeds", "8", "--holdout-seeds", "8",
                 "--validation-seeds", "4", "--teacher-nfe", "40", "--actors", "0", "--no-mlflow",
                 "--no-holdout-fid", "--no-prune", "--out-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "gradient placement (5 iterations" in printed
    (study_dir,) = [p for p in out.iterdir() if p.is_dir()]
    assert (study_dir / "best_schedule.json").is_file()
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(out / "optuna.journal")))
    (name,) = optuna.get_all_study_names(storage)
    trials = optuna.load_study(study_name=name, storage=storage).trials
    grad = [t for t in trials if t.user_attrs.get("kind") == "gradient"]
    assert len(grad) == 1 and grad[0].state.name == "COMPLETE" and len(trials) == 11


@pytest.mark.parametrize("flags, message", [(["--grad-iters", "0"], "--grad-iters must be an integer >= 1"),
                                            (["--slack-radius", "-0.5"], "--slack-radius must be a finite number >= 0"),
                                            (["--grad-loss", "features"],
                                             "--grad-loss features compares 1x8x8 images (the bundled digits feature "
                                             "network); this model's samples have shape (2,)"),
                                            (["--solver", "unipc"],
                                             "--method gradient differentiates ddim, dpmsolver++2m, dpmsolver++3m only")])
def test_sweep_cli_gradient_bad_input(tmp_path, capsys, flags, message):
    from jobs.cli import main

    out = tmp_path / "sweep"
    assert main(["sweep", "--model", GMM, "--method", "gradient", *flags, "--actors", "0", "--no-mlflow",
                 "--out-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not out.exists()


def test_sweep_gradient_on_actor_pools_equals_in_process(ray_local, tmp_path):
    # With actors the sweep's gradient runs data-parallel on its two live pools (the pruning screen's seeds
    # and the rest, 2 actors each at a fractional CPU share); the placement must be the one computed in this
    # process, up to float32 summation order.
    import optuna

    from search.study import make_storage
    from search.sweep import SweepConfig, run_sweep

    cfg = SweepConfig(model=GMM, nfe=5, solver="dpmsolver++2m", trials=3, num_seeds=12, screen_seeds=4,
                      holdout_seeds=4, validation_seeds=0, baselines=("uniform", "quadratic"), teacher_nfe=40,
                      holdout_fid=False, method="gradient", grad_iters=6, grad_lr=0.1, slack_radius=0.05)
    lines: dict[int, list[str]] = {0: [], 2: []}
    for a in (0, 2):
        run_sweep(cfg, study_name=f"a{a}", out_dir=tmp_path, actors=a, track=False, figures=False,
                  log=lines[a].append)
    assert any("gradient placement (6 iterations, on the actor pools" in s for s in lines[2])
    assert any("gradient placement (6 iterations, in process" in s for s in lines[0])
    storage = make_storage(tmp_path / "optuna.journal")
    grad = {a: [t for t in optuna.load_study(study_name=f"a{a}", storage=storage).trials
                if t.user_attrs.get("kind") == "gradient"] for a in (0, 2)}
    (g0,), (g2,) = grad[0], grad[2]
    assert len(g0.user_attrs["gradient_losses"]) == 7
    assert g0.user_attrs["gradient_losses"][-1] < g0.user_attrs["gradient_losses"][0]
    assert g2.user_attrs["gradient_losses"] == pytest.approx(g0.user_attrs["gradient_losses"], rel=1e-4)
    assert g2.user_attrs["continuous_timesteps"] == pytest.approx(g0.user_attrs["continuous_timesteps"], rel=1e-4)
    assert g2.user_attrs["timesteps"] == g0.user_attrs["timesteps"]


def test_sweep_logs_gradient_path_to_mlflow(tmp_path):
    # Real sqlite MLflow: the parent run carries the loss per iteration (metric) and the step positions per
    # iteration (JSON and plot artifacts), and the JSON is the course the trial recorded.
    import json

    import optuna
    from mlflow import MlflowClient

    from search.study import make_storage
    from search.sweep import SweepConfig, run_sweep

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = SweepConfig(model=GMM, nfe=4, trials=2, num_seeds=8, holdout_seeds=4, validation_seeds=0,
                      baselines=("uniform",), teacher_nfe=40, holdout_fid=False, prune=False, method="gradient",
                      grad_iters=4, grad_lr=0.1, grid_seeds=4)
    res = run_sweep(cfg, study_name="g", out_dir=tmp_path / "out", actors=0, tracking_uri=uri, figures=True,
                    log=lambda *_: None)
    c = MlflowClient(uri)
    arts = {a.path for a in c.list_artifacts(res.parent_run_id)}
    assert {"gradient_path.json", "gradient_path.png"} <= arts
    got = json.loads(open(c.download_artifacts(res.parent_run_id, "gradient_path.json", str(tmp_path))).read())
    (trial,) = [t for t in optuna.load_study(study_name="g", storage=make_storage(tmp_path / "out" / "optuna.journal")
                                             ).trials if t.user_attrs.get("kind") == "gradient"]
    assert got["iteration"] == [0, 1, 2, 3, 4] and got["solver"] == "ddim"
    assert got["continuous_timesteps"] == trial.user_attrs["gradient_path"]
    assert len(got["continuous_timesteps"][0]) == 4 and got["continuous_timesteps"][0] != got["continuous_timesteps"][-1]
    assert got["timesteps"] == trial.user_attrs["timesteps"]
    hist = sorted(c.get_metric_history(res.parent_run_id, "gradient_loss"), key=lambda m: m.step)
    assert [m.step for m in hist] == [0, 1, 2, 3, 4]
    assert [m.value for m in hist] == pytest.approx(got["loss"], rel=1e-12)
    # the placement alone has its own held-out row, compared with the best baseline like every warm start
    (row,) = [r for r in res.rows if r["schedule"] == "gradient"]
    assert row["timesteps"] == " ".join(map(str, trial.user_attrs["timesteps"])) and "x_best_baseline_lo" in row


def test_feature_loss_gradient_matches_finite_differences():
    # The feature-space loss on the bundled digits (UNet student, DPM-Solver++ 2M, feature network, float64):
    # the gradient in delta (the student's input, so every step and the feature net are on the path) along a
    # random direction equals the central difference. (Not checked in theta here: the UNet embeds its timestep
    # in float32, as diffusers casts it, and the feature net's ReLUs and max-pools are kinked, so no step size
    # makes a float64 difference in t both exact and smooth; theta's path is the mse one, checked on gmm.)
    from pipeline.evaluation.distances import make_distance

    m = load_model("bundled:digits")
    m.denoiser.double()
    dist = make_distance("features", m.data_range, m.sample_shape)
    x_T = torch.randn(2, *m.sample_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    teacher = ddim_sample(m.denoiser, x_T, uniform(50, m.alphas_cumprod).timesteps, m.alphas_cumprod)
    assert dist(teacher, teacher).abs().max() == 0
    theta = params_from_timesteps([850, 500, 200, 30], m.alphas_cumprod)
    u = torch.randn(x_T.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    delta = torch.zeros_like(x_T)

    def loss_at(d):
        return shard_loss_and_grad(m.denoiser, x_T, teacher, theta, m.alphas_cumprod, delta=d, distance=dist,
                                   solver="dpmsolver++2m")

    loss, g, g_delta = loss_at(delta)
    assert loss > 0 and g.abs().max() > 0
    h = 1e-6
    fd = (loss_at(delta + h * u)[0] - loss_at(delta - h * u)[0]) / (2 * h)
    assert float((g_delta * u).sum()) == pytest.approx(fd, rel=1e-6)


def _sweep_lpips(out) -> list[str]:
    return ["sweep", "--model", "bundled:digits", "--method", "gradient", "--grad-loss", "lpips", "--actors", "0",
            "--no-mlflow", "--out-dir", str(out)]


def test_lpips_without_the_package_is_one_line(tmp_path, capsys, monkeypatch):
    import sys

    from jobs.cli import main

    monkeypatch.setitem(sys.modules, "lpips", None)  # `import lpips` now raises ImportError, as where it is absent
    with pytest.raises(StridelabError, match="lpips needs the lpips package .* but the Python package lpips is not "
                                             "installed; use features or mse"):
        GradientConfig(loss="lpips")
    out = tmp_path / "sweep"
    assert main(_sweep_lpips(out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error: --grad-loss lpips needs the lpips package" in err[0], err
    assert not out.exists()


def test_lpips_offline_without_alexnet_weights_is_one_line(tmp_path, capsys, monkeypatch):
    # lpips would ask torchvision to download AlexNet; offline that is a URLError traceback deep in the first
    # trial. The check finds the missing checkpoint before any work.
    from jobs.cli import main

    pytest.importorskip("lpips")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    with pytest.raises(StridelabError, match=r"torchvision's AlexNet weights \(alexnet-owt-\*\.pth\) are not in "):
        GradientConfig(loss="lpips")
    out = tmp_path / "sweep"
    assert main(_sweep_lpips(out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "AlexNet weights" in err[0] and "use features or mse" in err[0], err
    assert not out.exists()


@pytest.fixture
def local_alexnet(tmp_path, monkeypatch):
    """A stand-in for torchvision's downloaded AlexNet checkpoint (random weights under the file name torchvision
    looks for), so the real lpips package builds its real network offline. Its distances are not LPIPS's
    published ones; what is tested is the path: the check, the net, the gradient through it."""
    lpips = pytest.importorskip("lpips")
    import torchvision

    from pipeline.evaluation import distances

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    ckpt = Path(torch.hub.get_dir()) / "checkpoints"
    ckpt.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), ckpt / "alexnet-owt-7be5be79.pth")
    distances._lpips_net.cache_clear()
    yield lpips
    distances._lpips_net.cache_clear()  # later tests must not reuse the stand-in network


@pytest.mark.filterwarnings("ignore::UserWarning")  # lpips 0.1.4 passes torchvision's deprecated `pretrained=`
def test_lpips_with_local_weights_is_a_distance_with_a_gradient(local_alexnet):
    from pipeline.evaluation.distances import check_available, make_distance

    check_available("lpips")
    m = load_model("bundled:digits")
    dist = make_distance("lpips", m.data_range, m.sample_shape)
    g = torch.Generator().manual_seed(1)
    a = torch.rand(3, *m.sample_shape, generator=g) * 2 - 1
    b = torch.rand(3, *m.sample_shape, generator=g) * 2 - 1
    assert dist(a, a).abs().max() < 1e-6
    d_ab = dist(a, b)
    assert d_ab.shape == (3,) and bool((d_ab > 0).all())
    assert torch.allclose(d_ab, dist(b, a), rtol=1e-4)  # symmetric
    x = a.clone().requires_grad_(True)
    dist(x, b).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().max() > 0


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_lpips_gradient_placement_lowers_its_loss(local_alexnet):
    # The whole `--grad-loss lpips` path in process: teacher, differentiable DDIM, LPIPS on upsampled digits,
    # Adam on the step logits. A few iterations from uniform must lower the loss they minimise.
    m = load_model("bundled:digits")
    fn = local_grad_fn(m, list(range(4)), teacher_nfe=20, loss="lpips")
    res = gradient_placement(fn, 5, m.alphas_cumprod, GradientConfig(iters=4, lr=0.2, loss="lpips"), num_seeds=4)
    assert len(res.losses) == 5 and all(math.isfinite(v) for v in res.losses)
    assert min(res.losses[1:]) < res.losses[0]
    validate_timesteps(res.schedule.timesteps, len(m.alphas_cumprod))


# ---- the opt-in model time shift (issue 13, item 2; measured in benchmarks/bench_time_shift.py) ----------------


@pytest.mark.parametrize("solver", ["ddim", "dpmsolver++2m"])
def test_zero_shift_is_the_solver_and_a_shift_changes_the_network_input_only(gmm, solver):
    from pipeline.evaluation.gradient import model_levels, sample_with_shift

    ts = [800, 500, 260, 90, 15]
    x_T = torch.randn(5, *gmm.sample_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    ref = get_solver(solver).sample(gmm.denoiser, x_T, ts, gmm.alphas_cumprod)
    assert torch.allclose(sample_with_shift(gmm.denoiser, x_T, ts, [0.0] * 5, gmm.alphas_cumprod, solver), ref,
                          rtol=0, atol=1e-10)
    assert torch.allclose(sample_with_shift(gmm.denoiser, x_T, ts, None, gmm.alphas_cumprod, solver), ref,
                          rtol=0, atol=1e-10)
    shifted = sample_with_shift(gmm.denoiser, x_T, ts, [0.3, 0, 0, 0, 0], gmm.alphas_cumprod, solver)
    assert (shifted - ref).abs().max() > 1e-4
    # the levels asked: log sigma + shift, clamped to the table's range (t = T - 1 cannot go higher)
    abar = gmm.alphas_cumprod.double()[torch.tensor([999, 500])]
    t_m, a_m = model_levels(abar, torch.tensor([1.0, -0.5], dtype=torch.float64), gmm.alphas_cumprod)
    sig = ((1 - abar) / abar).sqrt()
    assert t_m[0] == pytest.approx(999) and a_m[0] == pytest.approx(float(abar[0]))
    assert ((1 - a_m[1]) / a_m[1]).sqrt() == pytest.approx(float(sig[1]) * math.exp(-0.5), rel=1e-9)
    assert t_m[1] < 500


def test_shift_gradient_matches_finite_differences_and_zero_shift_loss(gmm, grad_fn):
    ts = [850, 600, 330, 140, 25]
    theta = params_from_timesteps(ts, gmm.alphas_cumprod)
    shifted_fn = local_grad_fn(gmm, SEEDS, TEACHER_NFE, dtype=torch.float64, time_shift=True)
    full = torch.cat([theta, torch.tensor([0.1, -0.2, 0.05, 0.3, -0.1], dtype=torch.float64)])
    loss0, g0, _ = grad_fn(theta, None)
    loss_z, g_z, _ = shifted_fn(torch.cat([theta, torch.zeros(5, dtype=torch.float64)]), None)
    assert loss_z == pytest.approx(loss0, rel=1e-12) and torch.allclose(g_z[:6], g0, rtol=1e-9, atol=1e-14)
    loss, g, _ = shifted_fn(full, None)
    assert g.shape == full.shape
    for k in (1, 7, 9):  # a logit and two shifts
        h = 1e-6
        e = torch.zeros_like(full)
        e[k] = h
        fd = (shifted_fn(full + e, None)[0] - shifted_fn(full - e, None)[0]) / (2 * h)
        assert float(g[k]) == pytest.approx(fd, rel=1e-4, abs=1e-10)


def test_time_shift_learns_lowers_the_loss_and_goes_in_meta(gmm):
    fn = local_grad_fn(gmm, SEEDS, TEACHER_NFE, dtype=torch.float64, time_shift=True)
    res = gradient_placement(fn, 5, gmm.alphas_cumprod, GradientConfig(iters=10, time_shift=True), num_seeds=len(SEEDS))
    assert res.theta.shape == (11,) and res.losses[-1] < res.losses[0]
    shift = res.schedule.meta["model_log_sigma_shift"]
    assert len(shift) == 5 and any(abs(v) > 1e-3 for v in shift)
    validate_timesteps(res.schedule.timesteps, 1000)
    # a gradient function built without the shift cannot be run with a config that has it (theta's length differs)
    with pytest.raises(StridelabError, match="time_shift"):
        gradient_placement(local_grad_fn(gmm, SEEDS, TEACHER_NFE, dtype=torch.float64), 5, gmm.alphas_cumprod,
                           GradientConfig(iters=1, time_shift=True), num_seeds=len(SEEDS))


def test_pool_gradient_with_time_shift_equals_in_process(ray_local, gmm):
    from pipeline.distributed.pool import SamplerPool
    from search.placement.gradient import pool_grad_fn

    theta = torch.cat([params_from_timesteps([850, 600, 330, 140, 25], gmm.alphas_cumprod),
                       torch.tensor([0.1, -0.2, 0.05, 0.3, -0.1], dtype=torch.float64)])
    loss, g, _ = local_grad_fn(gmm, SEEDS, TEACHER_NFE, dtype=torch.float64, time_shift=True)(theta, None)
    with SamplerPool(GMM, SEEDS, TEACHER_NFE, actors=2, num_cpus=0.5) as pool:
        ploss, pg, _ = pool_grad_fn([pool], dtype="float64", time_shift=True)(theta, None)
    assert ploss == pytest.approx(loss, rel=1e-12)
    assert torch.allclose(pg, g, rtol=1e-10, atol=1e-14)
