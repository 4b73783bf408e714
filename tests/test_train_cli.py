"""`stridelab train digits|features`: outputs, one-line errors, nothing written on failure."""

from __future__ import annotations

import json

import pytest

from jobs.cli import main


def test_train_features_writes_loadable_net(tmp_path, capsys):
    from pipeline.metrics.features import load_feature_net

    out = tmp_path / "features"
    assert main(["train", "features", "--epochs", "1", "--min-accuracy", "0", "--threads", "1", "--out-dir", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["command"].startswith("stridelab train features --epochs 1")
    assert load_feature_net(out).feature_dim == cfg["feature_dim"]
    assert "test accuracy" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == ["features"]  # no temp dirs left behind


def test_train_features_refuses_low_accuracy(tmp_path, cli_stderr):
    out = tmp_path / "features"
    rc = main(["train", "features", "--epochs", "1", "--min-accuracy", "1.01", "--threads", "1", "--out-dir", str(out)])
    assert rc == 2 and not out.exists() and list(tmp_path.iterdir()) == []
    err = cli_stderr()
    assert len(err) == 1 and "not saved" in err[0], err


def test_train_bad_input_is_one_line_exit_2(tmp_path, cli_stderr):
    assert main(["train", "digits", "--steps", "0", "--out-dir", str(tmp_path / "m")]) == 2
    assert main(["train", "features", "--epochs", "0", "--out-dir", str(tmp_path / "f")]) == 2
    err = cli_stderr()
    assert err == ["stridelab train: error: steps must be >= 1, got 0", "stridelab train: error: epochs must be >= 1, got 0"]
    assert list(tmp_path.iterdir()) == []


def test_train_digits_writes_pipeline(tmp_path):
    out = tmp_path / "ddpm"
    rc = main(["train", "digits", "--steps", "2", "--batch-size", "4", "--max-minutes", "0", "--threads", "1", "--out-dir", str(out)])
    assert rc == 0
    rec = json.loads((out / "TRAINING.json").read_text())
    assert rec["steps"] == 2 and rec["weights"] == "EMA" and rec["config"]["max_minutes"] is None
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_train_digits_never_writes_the_bundled_model_unless_asked(tmp_path, monkeypatch, cli_stderr):
    """Without --out-dir it writes results/train/digits (relative to the working directory); the shipped
    assets are replaced only with --replace-bundled (here pointed at a copy), and not with both flags."""
    from pipeline.training import ddpm

    shipped = ddpm.DEFAULT_DDPM_DIR / "unet" / "diffusion_pytorch_model.safetensors"
    before = shipped.read_bytes()
    monkeypatch.chdir(tmp_path)
    quick = ["--steps", "1", "--batch-size", "4", "--max-minutes", "0", "--threads", "1"]
    assert main(["train", "digits", *quick]) == 0
    rec = json.loads((tmp_path / "results" / "train" / "digits" / "TRAINING.json").read_text())
    assert rec["command"].endswith("--out-dir results/train/digits")
    assert shipped.read_bytes() == before

    monkeypatch.setattr(ddpm, "DEFAULT_DDPM_DIR", tmp_path / "bundled")
    assert main(["train", "digits", *quick, "--replace-bundled"]) == 0
    assert (tmp_path / "bundled" / "TRAINING.json").is_file() and shipped.read_bytes() == before
    assert json.loads((tmp_path / "bundled" / "TRAINING.json").read_text())["command"].endswith("--replace-bundled")

    with pytest.raises(SystemExit) as e:  # argparse's own usage error
        main(["train", "digits", *quick, "--replace-bundled", "--out-dir", "x"])
    assert e.value.code == 2 and "not allowed with argument" in cli_stderr()[-1]
