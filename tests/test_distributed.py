"""The Ray actor pool and Ray Data sampling on a real local Ray: same numbers as one process, any
number of actors, any batch size, and after an actor is killed mid-task."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tiny import tiny_unet

from pipeline.metrics import fid
from pipeline.distributed import (
    SamplerPool,
    SamplerWorker,
    generate_samples,
    shard_bounds,
    write_sample_dir,
)
from pipeline.core.batching import run_fixed_batches
from pipeline.errors import StridelabError
from pipeline.evaluation.inprocess import InProcessEvaluator
from pipeline.models.load import load_model
from pipeline.core.schedules import make_schedule

GMM = "gmm:blobs64"
SEEDS = list(range(100, 148))
TEACHER_NFE = 50


# --------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def unet_dir(tmp_path_factory) -> str:
    """A tiny random DDPM (UNet2DModel 8x8, widths 32/64) saved as a diffusers directory."""
    from diffusers import DDPMPipeline, DDPMScheduler

    unet = tiny_unet(attention=True)
    d = tmp_path_factory.mktemp("unet") / "ddpm"
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(d, safe_serialization=True)
    return str(d)


@pytest.fixture(scope="module")
def feature_net_dir(tmp_path_factory) -> str:
    """A randomly initialised digits feature net (FID/KID plumbing does not need a trained one)."""
    from pipeline.metrics.features import DigitsFeatureNet, save_feature_net

    torch.manual_seed(0)
    return str(save_feature_net(DigitsFeatureNet(feature_dim=32, mean=0.3, std=0.4),
                                tmp_path_factory.mktemp("feat") / "net"))


@pytest.fixture(scope="module")
def gmm_schedules():
    abar = load_model(GMM).alphas_cumprod
    return [make_schedule("uniform", 5, abar), make_schedule("karras", 5, abar), make_schedule("logsnr", 8, abar)]


@pytest.fixture(scope="module")
def gmm_pool(ray_local, feature_net_dir):
    """Two actors on the gmm model, with FID/KID against the digits test split."""
    features = f"digits:{feature_net_dir}"
    ref = fid.digits_reference("test", features)
    with SamplerPool(GMM, SEEDS, TEACHER_NFE, True, actors=2, extra_metrics=("fid", "kid"),
                     features=features, reference=ref) as pool:
        yield pool


# --------------------------------------------------------------------------------------------------
# Pure pieces (no Ray)


def test_shard_bounds_cover_exactly():
    for n in (1, 5, 48, 97):
        for parts in (1, 2, 3, 8, 200):
            b = shard_bounds(n, parts)
            assert [i for a, z in b for i in range(a, z)] == list(range(n))
            assert len(b) == min(n, parts)


def test_feature_stats_merge_equals_numpy_mean_and_cov():
    rng = np.random.default_rng(0)
    f = rng.normal(3.0, 0.5, size=(1797, 128)) + rng.normal(0, 2.0, size=128)  # offset mean, like real features
    cuts = [0, 1, 200, 201, 900, 1797]
    for shift in (None, f[:100].mean(0)):
        parts = [fid.FeatureStats.of(f[a:b], shift) for a, b in zip(cuts, cuts[1:])]
        s = fid.FeatureStats.merge(parts)
        assert s.n == 1797
        np.testing.assert_allclose(s.mean(), f.mean(axis=0), rtol=0, atol=1e-12)
        np.testing.assert_allclose(s.cov(), np.cov(f, rowvar=False), rtol=0, atol=1e-10)
    with pytest.raises(StridelabError):
        fid.FeatureStats.of(f[:5]) + fid.FeatureStats.of(f[:5], np.ones(128))


def test_unet_samples_do_not_depend_on_batching(unet_dir):
    """Per-sample noise + fixed-size network calls: any split of the seeds gives the same bits (eta > 0)."""
    w = SamplerWorker(unet_dir, forward_batch=16)
    ts = make_schedule("karras", 6, w.model.alphas_cumprod).timesteps
    seeds = list(range(21))
    full = w.sample(seeds, ts, eta=0.7)
    parts = torch.cat([w.sample(seeds[:1], ts, 0.7), w.sample(seeds[1:17], ts, 0.7), w.sample(seeds[17:], ts, 0.7)])
    assert torch.equal(full, parts)
    assert torch.equal(full[5:9], w.sample(seeds[5:9], ts, 0.7))
    # Without the fixed-size calls the UNet's output does depend on the batch (this is what the wrapper fixes).
    raw = SamplerWorker(unet_dir, forward_batch=0)
    a = raw.sample(seeds, ts, 0.7)
    b = torch.cat([raw.sample(seeds[i : i + 5], ts, 0.7) for i in range(0, 21, 5)])
    assert not torch.equal(a, b)


def test_run_fixed_batches_calls_one_shape():
    shapes = []

    def f(x):
        shapes.append(x.shape[0])
        return x * 2

    x = torch.arange(10.0)
    assert torch.equal(run_fixed_batches(f, [x], 4), x * 2)
    assert shapes == [4, 4, 4]


def test_teacher_disk_cache(tmp_path):
    w1 = SamplerWorker(GMM, cache_dir=str(tmp_path))
    t1 = w1.teacher(SEEDS[:8], 20)
    w2 = SamplerWorker(GMM, cache_dir=str(tmp_path))
    t2 = w2.teacher(SEEDS[:8], 20)
    assert (w1.teacher_builds, w2.teacher_builds) == (1, 0)
    assert torch.equal(t1.x0, t2.x0)
    assert len(list(tmp_path.glob("teacher-*.safetensors"))) == 1
    w2.teacher(SEEDS[:9], 20)  # another seed set: another teacher
    assert w2.teacher_builds == 1
    # the same spec with other weights (a retrained checkpoint) never reuses the old teacher
    def retrained(spec, device, dtype):
        m = load_model(spec, device, dtype)
        m.denoiser.means.mul_(1.01)
        return m

    w3 = SamplerWorker(GMM, loader=retrained, cache_dir=str(tmp_path))
    t3 = w3.teacher(SEEDS[:8], 20)
    assert w3.teacher_builds == 1 and not torch.equal(t3.x0, t1.x0)
    assert len(list(tmp_path.glob("teacher-*.safetensors"))) == 3


def test_inception_offline_is_one_clear_error(monkeypatch, tmp_path):
    """clean-fid's Inception weights and reference statistics cannot be fetched: one StridelabError line.

    Offline by construction, whatever the machine's network: clean-fid's downloader (urllib's urlopen) is
    replaced by one that fails as a machine without a network does, so nothing is ever downloaded; what
    bounds the wait on a stalled connection (the socket timeout set around the download) is checked."""
    import socket
    import urllib.error

    from cleanfid import downloads_helper

    calls = []

    def no_network(url, *args, **kwargs):
        calls.append((str(getattr(url, "full_url", url)), socket.getdefaulttimeout()))
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(downloads_helper.urllib.request, "urlopen", no_network)
    monkeypatch.setattr(fid, "INCEPTION_DIR", str(tmp_path))  # never find a pre-fetched copy
    before = socket.getdefaulttimeout()
    with pytest.raises(StridelabError) as e:
        fid.ensure_inception_weights()
    msg = str(e.value)
    assert "\n" not in msg and "offline" in msg and "pre-fetch" in msg and "Inception weights" in msg
    with pytest.raises(StridelabError, match="reference statistics .* offline"):
        fid.cleanfid_reference("no_such_dataset", 32, "train")
    assert [u.rsplit("/", 1)[-1] for u, _ in calls] == ["inception-2015-12-05.pt", "no_such_dataset_clean_train_32.npz"]
    assert all(timeout == fid.DOWNLOAD_TIMEOUT_S for _, timeout in calls)  # a stalled download gives up
    assert socket.getdefaulttimeout() == before  # and the process-wide timeout is restored
    assert list(tmp_path.iterdir()) == []  # no half-written weights file


# --------------------------------------------------------------------------------------------------
# The pool on a real local Ray


def test_pool_equals_in_process_evaluator(gmm_pool, gmm_schedules):
    """The evaluate() contract: same schedules, same order, bit-identical per-seed recon and inversion."""
    ref = InProcessEvaluator(load_model(GMM), SEEDS, TEACHER_NFE, inversion=True).evaluate(gmm_schedules)
    got = gmm_pool.evaluate(gmm_schedules)
    local = SamplerPool(GMM, SEEDS, TEACHER_NFE, True, actors=0).evaluate(gmm_schedules)
    assert len(got) == len(ref) == 3
    for r, g, l in zip(ref, got, local):
        assert g.schedule == r.schedule
        assert g.recon.dtype == r.recon.dtype == torch.float64 and g.recon.shape == (len(SEEDS),)
        assert torch.equal(g.recon, r.recon) and torch.equal(l.recon, r.recon)
        assert torch.equal(g.inversion, r.inversion) and torch.equal(l.inversion, r.inversion)
        assert g.seconds > 0 and set(g.extra) == {"fid", "kid"}
        assert g.summary()["recon"] == r.summary()["recon"]
    # The teacher was computed once per actor, and stays there across calls.
    gmm_pool.evaluate(gmm_schedules[:1])
    stats = gmm_pool.worker_stats()
    assert [s["teacher_builds"] for s in stats] == [1, 1]


def test_pool_fid_kid_equal_single_process(gmm_pool, gmm_schedules, feature_net_dir):
    """Actors return (n, sum f, sum f f^T) and rows; the merged FID equals np.mean/np.cov's, KID is exact."""
    features = f"digits:{feature_net_dir}"
    ref = fid.digits_reference("test", features)
    w = SamplerWorker(GMM)
    sched = gmm_schedules[1]
    x0 = w.sample(SEEDS, sched.timesteps)
    feats = fid.features_in_chunks(fid.make_feature_fn(features), w.model.to_unit(x0), 64)
    from pipeline.metrics.features import fid_from_features, kid_from_features

    got = gmm_pool.evaluate([sched])[0].extra
    assert got["fid"] == pytest.approx(fid_from_features(feats, ref.feats), rel=1e-9, abs=1e-10)
    assert got["kid"] == kid_from_features(feats, ref.feats)
    assert got["fid"] > 0


def test_teachers_own_schedule_reuses_its_samples(gmm_pool, feature_net_dir):
    """Evaluating the teacher's schedule (the FID floor row of a sweep's table) returns the cached teacher
    output: recon exactly 0, FID equal to that of freshly sampled teacher steps."""
    abar = load_model(GMM).alphas_cumprod
    teacher = make_schedule("uniform", TEACHER_NFE, abar)
    got = gmm_pool.evaluate([teacher])[0]
    assert torch.equal(got.recon, torch.zeros_like(got.recon))
    w = SamplerWorker(GMM)
    x0 = w.sample(SEEDS, teacher.timesteps)
    feats = fid.features_in_chunks(fid.make_feature_fn(f"digits:{feature_net_dir}"), w.model.to_unit(x0), 64)
    from pipeline.metrics.features import fid_from_features

    ref = fid.digits_reference("test", f"digits:{feature_net_dir}")
    assert got.extra["fid"] == pytest.approx(fid_from_features(feats, ref.feats), rel=1e-6)
    local = InProcessEvaluator(load_model(GMM), SEEDS, TEACHER_NFE).evaluate([teacher])[0]
    assert torch.equal(local.recon, torch.zeros_like(local.recon))


def test_pool_rejects_bad_input(gmm_pool):
    with pytest.raises(StridelabError, match="Schedule"):
        gmm_pool.evaluate([[999, 500, 0]])
    with pytest.raises(StridelabError, match="unknown metric"):
        SamplerPool(GMM, SEEDS, actors=0, extra_metrics=("bogus",))
    with pytest.raises(StridelabError, match="actors"):
        SamplerPool(GMM, SEEDS, actors=-1)
    with pytest.raises(StridelabError, match="out of range"):  # raised inside an actor, surfaced as one line
        gmm_pool.sample([1, 2], [5000, 3])


def _wait_for(pattern_dir: Path, suffix: str, timeout: float = 60.0) -> Path:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        hits = sorted(pattern_dir.glob(f"*{suffix}"))
        if hits:
            return hits[0]
        time.sleep(0.05)
    raise AssertionError(f"no *{suffix} marker in {pattern_dir} after {timeout} s")


def test_killed_actor_is_restarted_and_its_shard_redone(ray_local, unet_dir, tmp_path):
    """SIGKILL an actor in the middle of its shard: Ray restarts it, re-runs the task, same bits."""
    seeds = list(range(96))
    ts = make_schedule("uniform", 25, load_model(unet_dir).alphas_cumprod).timesteps
    expected = SamplerPool(unet_dir, seeds, recon=False, actors=0, forward_batch=16).sample(seeds, ts, eta=0.3)
    trace = tmp_path / "trace"
    trace.mkdir()
    with SamplerPool(unet_dir, seeds, recon=False, actors=2, trace_dir=trace, forward_batch=16) as pool:
        before = pool.pids()
        out: dict = {}
        th = threading.Thread(target=lambda: out.update(x=pool.sample(seeds, ts, eta=0.3)))
        th.start()
        marker = _wait_for(trace, ".sample.start")
        victim = int(marker.name.split(".")[0])
        assert victim in before
        os.kill(victim, signal.SIGKILL)
        th.join(timeout=120)
        assert not th.is_alive() and "x" in out
        after = pool.pids()
    assert not (trace / marker.name.replace(".start", ".done")).exists()  # it really died mid-task
    assert victim not in after and len(set(after)) == 2
    assert out["x"].shape == (96, 1, 8, 8)
    assert torch.equal(out["x"], expected)  # 1 process == 2 actors == 2 actors with a crash


def test_ray_data_sampling_survives_a_killed_actor(ray_local, unet_dir, tmp_path):
    """Ray Data's actor pool restarts a killed actor and redoes its batch: nothing missing or duplicated, and the
    Parquet file byte-identical to an undisturbed in-process run's with another batch size (row groups of a
    fixed size, here 20 rows: 20, 20, 8, whatever the batches)."""
    import pyarrow.parquet as pq

    model = load_model(unet_dir)
    sched = make_schedule("karras", 20, model.alphas_cumprod)
    n = 48
    kw = dict(num_samples=n, first_seed=7, schedule=sched, eta=0.0, model=unet_dir,
              sample_shape=model.sample_shape, data_range=model.data_range, progress=False, row_group=20)
    write_sample_dir(tmp_path / "ref", generate_samples(unet_dir, sched.timesteps, n, seed=7, actors=0, batch_size=50,
                                                         forward_batch=16), **kw)
    trace = tmp_path / "trace"
    trace.mkdir()
    err: list = []

    def run():
        try:
            write_sample_dir(tmp_path / "ray", generate_samples(unet_dir, sched.timesteps, n, seed=7, actors=2,
                                                                batch_size=16, forward_batch=16, trace_dir=str(trace)),
                             **kw)
        except BaseException as e:  # surfaced below
            err.append(e)

    th = threading.Thread(target=run)
    th.start()
    marker = _wait_for(trace, ".sample.start", timeout=120)
    os.kill(int(marker.name.split(".")[0]), signal.SIGKILL)
    th.join(timeout=170)
    assert not th.is_alive() and not err, err
    a, b = pq.read_table(tmp_path / "ref" / "samples.parquet"), pq.read_table(tmp_path / "ray" / "samples.parquet")
    assert b.column("seed").to_pylist() == list(range(7, 7 + n))
    assert a.equals(b)
    ref, got = (tmp_path / "ref" / "samples.parquet").read_bytes(), (tmp_path / "ray" / "samples.parquet").read_bytes()
    assert [pq.ParquetFile(tmp_path / d / "samples.parquet").metadata.row_group(i).num_rows
            for d in ("ref", "ray") for i in range(3)] == [20, 20, 8] * 2
    assert ref == got  # byte for byte


def test_gpus_per_actor_is_requested_as_given(ray_local):
    """On an autoscaling cluster scaled to zero GPUs the request itself must name GPUs (the CPU-only local
    Ray here has none: sizing from the cluster would give CPU actors)."""
    from pipeline.distributed import actor_resources

    assert "num_gpus" not in actor_resources(2)
    assert actor_resources(2, gpus_per_actor=1) == {"num_gpus": 1.0, "num_cpus": 1.0}
    assert actor_resources(4, gpus_per_actor=0.5) == {"num_gpus": 0.5, "num_cpus": 1.0}
    with pytest.raises(StridelabError, match="gpus_per_actor"):
        actor_resources(2, gpus_per_actor=0)
