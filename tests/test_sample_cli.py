"""`stridelab sample`: Parquet + grid written atomically, identical for any --actors / --batch-size."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from jobs.cli import main
from pipeline.distributed import data as distributed
from pipeline.core.schedules import Schedule

MODEL = "gmm:blobs64"  # [1, 8, 8] samples: images


def _args(out, *extra):
    return ["sample", "--model", MODEL, "--schedule", "karras", "--nfe", "5", "--num-seeds", "40", "--eta", "0.5",
            "--seed", "3", "--no-progress", "--out-dir", str(out), *extra]


def test_sample_identical_for_any_actors_and_batch_size(ray_local, tmp_path):
    assert main(_args(tmp_path / "ray", "--actors", "2", "--batch-size", "7")) == 0
    assert main(_args(tmp_path / "local", "--actors", "0", "--batch-size", "40")) == 0
    a, b = pq.read_table(tmp_path / "ray" / "samples.parquet"), pq.read_table(tmp_path / "local" / "samples.parquet")
    assert a.equals(b)
    # byte for byte too: row groups have a fixed size, not the batches' (7 here, 40 there)
    assert (tmp_path / "ray" / "samples.parquet").read_bytes() == (tmp_path / "local" / "samples.parquet").read_bytes()
    assert a.column("seed").to_pylist() == list(range(3, 43))
    assert set(a.column("schedule").to_pylist()) == {"karras"} and set(a.column("nfe").to_pylist()) == {5}
    assert set(a.column("eta").to_pylist()) == {0.5}
    meta = json.loads(a.schema.metadata[b"stridelab"])
    assert meta["sample_shape"] == [1, 8, 8] and meta["dtype"] == "float32" and meta["model"] == MODEL
    x = np.asarray(a.column("sample").to_pylist(), dtype=np.float32).reshape(40, *meta["sample_shape"])
    # The PNG is the tensor mapped from [-1, 1] to uint8.
    png = np.asarray(Image.open(io.BytesIO(a.column("image")[4].as_py())))
    want = distributed.to_uint8((torch.from_numpy(x[4]) + 1) / 2)[0]
    assert png.shape == (8, 8) and np.array_equal(png, want)
    assert Image.open(tmp_path / "ray" / "grid.png").size[0] > 8
    assert Schedule.load(tmp_path / "ray" / "schedule.json").nfe == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["local", "ray"]  # no temp dirs left


@pytest.mark.parametrize("sizes", [[100], [1] * 100, [7] * 14 + [2], [30, 1, 9, 60], [10] * 10])
def test_row_groups_are_fixed_whatever_the_batches(tmp_path, sizes):
    """The driver writes row groups of exactly `row_group` rows (the last shorter) from any batch sizes; the
    file is the same bytes for every split of the same samples."""
    from pipeline.core.schedules import make_schedule
    from pipeline.models.load import load_model

    model = load_model(MODEL)
    s = make_schedule("uniform", 3, model.alphas_cumprod)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(100, 64, generator=gen).numpy()
    png = [distributed.png_bytes(distributed.hwc(u)) for u in distributed.to_uint8(torch.from_numpy(x).view(-1, 1, 8, 8))]

    def batches(cuts):
        a = 0
        for n in cuts:
            yield {"seed": np.arange(a, a + n) + 5, "sample": x[a:a + n], "image": np.array(png[a:a + n], dtype=object)}
            a += n

    def write(name, cuts):
        d = distributed.write_sample_dir(tmp_path / name, batches(cuts), num_samples=100, first_seed=5, schedule=s,
                                         eta=0.0, model=MODEL, sample_shape=(1, 8, 8), data_range=(-1.0, 1.0),
                                         progress=False, row_group=30)
        return (d / "samples.parquet").read_bytes()

    ref = write("one", [100])
    assert write("split", sizes) == ref
    meta = pq.ParquetFile(tmp_path / "split" / "samples.parquet").metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [30, 30, 30, 10]
    assert distributed.row_group_rows(64) == 16384 and distributed.row_group_rows(3 * 64 * 64) == 85


def test_schedule_file_and_non_image_model(tmp_path):
    from pipeline.models.load import load_model
    from pipeline.core.schedules import make_schedule

    s = make_schedule("logsnr", 4, load_model("gmm:ring8").alphas_cumprod)
    s.save(tmp_path / "s.json")
    out = tmp_path / "o"
    assert main(["sample", "--model", "gmm:ring8", "--schedule", str(tmp_path / "s.json"), "--num-seeds", "50",
                 "--actors", "0", "--no-progress", "--out-dir", str(out)]) == 0
    t = pq.read_table(out / "samples.parquet")
    assert t.num_rows == 50 and "image" not in t.column_names and t.schema.field("sample").type.list_size == 2
    assert (out / "grid.png").is_file()


@pytest.mark.parametrize("bad, needle", [
    (["--schedule", "nope"], "unknown schedule"),
    (["--nfe", "0"], "nfe"),
    (["--actors", "-2"], "--actors"),
    (["--num-seeds", "0"], "--num-seeds"),
    (["--batch-size", "0"], "--batch-size"),
    (["--model", "gmm:nope"], "mixture"),
])
def test_bad_input_is_one_line_exit_2_and_no_directory(tmp_path, cli_stderr, bad, needle):
    out = tmp_path / "out"
    assert main(_args(out, "--actors", "0", *bad)) == 2
    err = cli_stderr()
    assert len(err) == 1 and needle in err[0] and err[0].startswith("stridelab sample: error:"), err
    assert list(tmp_path.iterdir()) == []


def test_actors_no_node_can_host_stop_at_the_placement_timeout(ray_local, tmp_path, cli_stderr):
    # Ray Data alone waits for ever for actors no node can host; the sample stops by the pool's rule
    # (`PlacementWatch`): one line naming the flag, exit 2, no directory.
    import time

    out = tmp_path / "out"
    t0 = time.monotonic()
    assert main(_args(out, "--actors", "1", "--actor-resources", '{"no_such_node": 1}',
                      "--placement-timeout", "3")) == 2
    assert time.monotonic() - t0 < 90
    err = cli_stderr()
    assert len(err) == 1 and err[0].startswith("stridelab sample: error: no live Ray node can host the sampler actors")
    assert "no_such_node 1" in err[0] and "--placement-timeout 3 s" in err[0], err
    assert list(tmp_path.iterdir()) == []


def test_failure_midway_leaves_no_partial_directory(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous run")
    calls = {"n": 0}
    real = distributed.png_bytes

    def flaky(img):
        calls["n"] += 1
        if calls["n"] > 15:
            raise RuntimeError("disk on fire")
        return real(img)

    monkeypatch.setattr(distributed, "png_bytes", flaky)
    with pytest.raises(RuntimeError, match="disk on fire"):
        main(_args(out, "--actors", "0", "--batch-size", "10"))
    assert calls["n"] > 15  # the first batches were written before the failure
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp dir left behind
    assert [p.name for p in out.iterdir()] == ["old.txt"]  # the previous output is untouched
