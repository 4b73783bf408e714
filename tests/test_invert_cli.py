"""`stridelab invert` on the bundled digits model with images of the digits test split: outputs, the
round-trip error it reports (the `evaluate --metrics inversion` metric), asymmetric schedules, and one-line
errors with nothing written for each bad input."""

from __future__ import annotations

import csv
import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from jobs.cli import main
from pipeline.core.schedules import Schedule, uniform
from pipeline.io.noise_files import read_noise
from pipeline.metrics.recon import inversion_errors, round_trip
from pipeline.models.digits import load_digits_images
from pipeline.models.load import load_model

N = 4


@pytest.fixture(scope="module")
def model():
    return load_model("bundled:digits")


@pytest.fixture(scope="module")
def digits():
    return load_digits_images("test")[:N]


def _png(u8: np.ndarray, mode: str = "L") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(u8, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def png_dir(tmp_path_factory, digits):
    d = tmp_path_factory.mktemp("pngs")
    u8 = ((digits[:, 0] + 1) / 2 * 255).round().to(torch.uint8).numpy()
    for i, img in enumerate(u8):
        (d / f"digit{i}.png").write_bytes(_png(img))
    return d


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_png_folder_round_trip(png_dir, tmp_path, model, capsys):
    out = tmp_path / "inv"
    assert main(["invert", "--images", str(png_dir), "--schedule", "uniform", "--nfe", "5", "--out-dir", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["errors.csv", "grid.png", "noise.safetensors", "schedule.json"]
    rows = _rows(out / "errors.csv")
    assert [r["name"] for r in rows] == [f"digit{i}" for i in range(N)]

    # The reported error is the evaluate metric on the same images (PNG quantised to 8 bits, as read).
    x0 = torch.from_numpy(np.stack([np.asarray(Image.open(png_dir / f"digit{i}.png"))[None] for i in range(N)])
                          .astype(np.float32) / 255 * 2 - 1)
    sched = uniform(5, model.alphas_cumprod)
    ref = inversion_errors(model.denoiser, x0, sched.timesteps, model.alphas_cumprod, model.to_unit)
    np.testing.assert_allclose([float(r["mse"]) for r in rows], ref.numpy(), rtol=1e-6)
    assert 1e-4 < ref.mean() < 5e-2  # a real, imperfect round trip at 5 steps

    noise, names, desc = read_noise(out / "noise.safetensors")
    assert noise.shape == (N, 1, 8, 8) and names == [r["name"] for r in rows]
    assert desc["timestep"] == sched.timesteps[0] and desc["encode_timesteps"] == list(sched.timesteps[::-1])
    assert 0.5 < noise.std() < 1.5  # a code at the top level looks like noise
    assert Schedule.load(out / "schedule.json").timesteps == sched.timesteps
    assert Image.open(out / "grid.png").size == (N * 33 + 1, 2 * 33 + 1)  # 8x8 at x4 + 1px gaps, two rows
    assert "round-trip MSE on [0, 1] mean" in capsys.readouterr().out


def test_more_encoder_steps_and_parquet(tmp_path, digits, model):
    """An encoder of 20 steps and a 5-step decoder from the same top timestep; Parquet in and out."""
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"seed": list(range(7, 7 + N)),
                             "sample": pa.FixedSizeListArray.from_arrays(pa.array(digits.numpy().ravel()), 64)}), src)
    enc = Schedule(tuple(range(950, -1, -50)), 1000, "fine")  # 20 steps, top 950
    dec = Schedule((950, 700, 400, 150, 10), 1000, "coarse")
    enc_path, dec_path = enc.save(tmp_path / "enc.json"), dec.save(tmp_path / "dec.json")
    out = tmp_path / "inv"
    assert main(["invert", "--images", str(src), "--schedule", str(enc_path), "--decode-schedule", str(dec_path),
                 "--format", "parquet", "--out-dir", str(out)]) == 0
    table = pq.read_table(out / "errors.parquet").to_pylist()
    assert [r["name"] for r in table] == [str(s) for s in range(7, 7 + N)]
    rt = round_trip(model.denoiser, digits, enc.encode_timesteps, dec.timesteps, model.alphas_cumprod, model.to_unit)
    np.testing.assert_allclose([r["mse"] for r in table], rt.errors.numpy(), rtol=1e-6)
    saved = Schedule.load(out / "schedule.json")  # the decoder, carrying its encoder: both directions
    assert saved.timesteps == dec.timesteps and saved.encode_timesteps == enc.encode_timesteps
    noise, names, _ = read_noise(out / "noise.parquet")
    torch.testing.assert_close(noise, rt.x_T.float())


def _bad(tmp_path, images, *extra):
    out = tmp_path / "never"
    rc = main(["invert", "--images", str(images), "--schedule", "uniform", "--nfe", "5", "--out-dir", str(out), *extra])
    assert rc == 2 and not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".never")]  # no temp dir left either


def _write(path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case,message", [
    ("size", "is 9x9 pixels, the model takes 8x8"),
    ("channels", "has 3 channel(s) (RGB), the model takes 1"),
    ("corrupt", "not a readable PNG"),
    ("range", "outside the model's data range [-1, 1]"),
    ("shape", "has shape [4, 8, 8], the model takes [N, 1, 8, 8]"),
    ("nan", "image 1 has non-finite values"),
    ("npy-corrupt", "not a readable .npy array"),
    ("parquet-columns", "has no 'sample' or 'image' column"),
    ("parquet-corrupt", "not a readable Parquet file"),
    ("empty-folder", "no .png files"),
    ("decoder", "--decode-schedule starts at timestep 900 but the --schedule encoder ends at 800"),
    ("digits-split", "expected digits:SPLIT[:N]"),
    ("digits-count", "the test split has 360 images, asked for 361"),
])
def test_bad_inputs_are_one_line_and_write_nothing(case, message, tmp_path, png_dir, digits, capsys):
    ok = _png(np.zeros((8, 8), np.uint8))
    extra = ()
    if case == "size":
        src = tmp_path / "d"
        _write(src / "a.png", ok)
        _write(src / "b.png", _png(np.zeros((9, 9), np.uint8)))
    elif case == "channels":
        src = _write(tmp_path / "d" / "a.png", _png(np.zeros((8, 8, 3), np.uint8), "RGB")).parent
    elif case == "corrupt":
        src = tmp_path / "d"
        _write(src / "a.png", ok)
        _write(src / "b.png", ok[:20])  # truncated
    elif case in ("range", "shape", "nan"):
        x = {"range": digits.numpy() * 8 + 8, "shape": digits.numpy()[:, 0], "nan": digits.numpy().copy()}[case]
        if case == "nan":
            x[1, 0, 2, 2] = np.nan
        src = tmp_path / "x.npy"
        np.save(src, x)
    elif case == "npy-corrupt":
        src = _write(tmp_path / "x.npy", b"\x93NUMPY garbage")
    elif case == "parquet-columns":
        src = tmp_path / "x.parquet"
        pq.write_table(pa.table({"pixels": [1.0, 2.0]}), src)
    elif case == "parquet-corrupt":
        src = _write(tmp_path / "x.parquet", b"PAR1 not really")
    elif case == "empty-folder":
        src = tmp_path / "d"
        src.mkdir()
    elif case.startswith("digits"):
        src = {"digits-split": "digits:val:4", "digits-count": "digits:test:361"}[case]
    else:
        src = png_dir
        extra = ("--decode-schedule", str(Schedule((900, 10), 1000).save(tmp_path / "dec.json")))
    capsys.readouterr()
    _bad(tmp_path, src, *extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("stridelab invert: error: ") and message in err[0], err
    if case in ("size", "corrupt"):
        assert "b.png" in err[0]  # names the bad file


def test_the_bundled_digits_and_a_sample_parquet_invert(tmp_path, capsys):
    """The README's commands: `digits:test:N` names the bundled test split; a `stridelab sample` output
    (whose values overshoot [-1, 1] a little, as a model's samples do) inverts as it is."""
    assert main(["invert", "--images", "digits:test:6", "--schedule", "uniform", "--nfe", "5",
                 "--out-dir", str(tmp_path / "inv")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "inv" / "errors.csv")))
    assert [r["name"] for r in rows] == [f"digits-test-{i}" for i in range(6)]
    assert all(0 < float(r["mse"]) < 0.05 for r in rows)
    x = load_digits_images("test")[:2].numpy()
    x[0, 0, 0, 0], x[1, 0, 0, 0] = -1.2, 1.24  # what sampled digits reach
    np.save(tmp_path / "over.npy", x)
    assert main(["invert", "--images", str(tmp_path / "over.npy"), "--schedule", "uniform", "--nfe", "5",
                 "--out-dir", str(tmp_path / "inv2")]) == 0
    capsys.readouterr()


def test_a_schedule_with_model_time_shifts_inverts_with_both(tmp_path, digits, model, capsys):
    """A schedule file carrying the encoder's and the decoder's shifts (what `sweep --objective inversion
    --time-shift` exports): `stridelab invert` runs both, reports them, records them in the noise file, and its
    schedule.json keeps both; another decoder keeps the encoder's shift only."""
    from pipeline.core.schedules import INVERSE_MODEL_SHIFT_KEY, MODEL_SHIFT_KEY
    from pipeline.evaluation.inprocess import shifted_round_trip

    steps = (999, 700, 420, 200, 60)
    enc, dec = [0.3, -0.2, 0.1, 0.4, 0.0], [0.0, -0.3, 0.2, 0.1, -0.4]
    path = Schedule(steps, 1000, "learned", meta={INVERSE_MODEL_SHIFT_KEY: enc, MODEL_SHIFT_KEY: dec}).save(tmp_path / "s.json")
    out = tmp_path / "inv"
    assert main(["invert", "--images", "digits:test:4", "--schedule", str(path), "--out-dir", str(out)]) == 0
    assert "model time shifts: encoder and decoder" in capsys.readouterr().out
    errs = [float(r["mse"]) for r in _rows(out / "errors.csv")]
    want = shifted_round_trip(model.denoiser, digits, steps[::-1], steps, model.alphas_cumprod, model.to_unit, enc, dec)
    plain = shifted_round_trip(model.denoiser, digits, steps[::-1], steps, model.alphas_cumprod, model.to_unit)
    np.testing.assert_allclose(errs, want.errors.numpy(), rtol=1e-6)
    assert not np.allclose(errs, plain.errors.numpy(), rtol=1e-3)
    saved = Schedule.load(out / "schedule.json")
    assert saved.inverse_model_shift == tuple(enc) and saved.model_shift == tuple(dec)
    _, _, meta = read_noise(out / "noise.safetensors")
    assert meta["encode_shift"] == enc and meta["decode_shift"] == dec
    # decoding with another (unshifted) schedule: the encoder's shift stays, the decoder runs plain
    other = Schedule(steps, 1000, "plain").save(tmp_path / "d.json")
    out2 = tmp_path / "inv2"
    assert main(["invert", "--images", "digits:test:4", "--schedule", str(path), "--decode-schedule", str(other),
                 "--out-dir", str(out2)]) == 0
    assert "model time shifts: encoder)" in capsys.readouterr().out
    saved2 = Schedule.load(out2 / "schedule.json")
    assert saved2.inverse_model_shift == tuple(enc) and saved2.model_shift is None
    half = shifted_round_trip(model.denoiser, digits, steps[::-1], steps, model.alphas_cumprod, model.to_unit, enc, None)
    np.testing.assert_allclose([float(r["mse"]) for r in _rows(out2 / "errors.csv")], half.errors.numpy(), rtol=1e-6)
