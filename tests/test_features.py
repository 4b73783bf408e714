"""The bundled digits feature net and the FID/KID helpers built on clean-fid."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.models.digits import load_digits_images, load_digits_labels, to_unit
from pipeline.metrics.features import (
    DEFAULT_FEATURES_DIR,
    WEIGHTS_FILE,
    DigitsFeatureNet,
    accuracy,
    extract_features,
    fid_from_features,
    kid_from_features,
    load_feature_net,
    save_feature_net,
)


@pytest.fixture(scope="module")
def net() -> DigitsFeatureNet:
    return load_feature_net()


@pytest.fixture(scope="module")
def feats(net):
    return {s: extract_features(to_unit(load_digits_images(s)), net) for s in ("train", "test")}


def test_bundled_net_is_safetensors_only():
    files = sorted(p.name for p in DEFAULT_FEATURES_DIR.iterdir())
    assert files == ["config.json", WEIGHTS_FILE]
    raw = (DEFAULT_FEATURES_DIR / WEIGHTS_FILE).read_bytes()
    header_len = int.from_bytes(raw[:8], "little")  # safetensors: u64 header size, then JSON
    assert json.loads(raw[8 : 8 + header_len])["__metadata__"]["format"] == "pt"
    assert len(raw) < 2_000_000
    cfg = json.loads((DEFAULT_FEATURES_DIR / "config.json").read_text())
    assert cfg["test_accuracy"] >= 0.97


def test_test_split_accuracy(net):
    acc = accuracy(net, to_unit(load_digits_images("test")), load_digits_labels("test"))
    assert acc >= 0.97, acc


def test_forward_contract_0_255_and_channels(net):
    u = to_unit(load_digits_images("test")[:16])
    f1 = net(u * 255.0)
    assert f1.shape == (16, net.feature_dim) and f1.dtype == torch.float32
    torch.testing.assert_close(net((u * 255.0).repeat(1, 3, 1, 1)), f1)
    # The scale matters: [0, 1] input is not the same as [0, 255] input.
    assert not torch.allclose(net(u), f1, atol=1e-2)
    with pytest.raises(ValueError, match="8, 8"):
        net(torch.zeros(2, 1, 16, 16))


def test_extract_features_validates_range(net):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        extract_features(load_digits_images("test")[:4], net)  # [-1, 1] model range, not [0, 1]
    out = extract_features(to_unit(load_digits_images("test")[:5]), net, batch_size=2)
    assert out.shape == (5, net.feature_dim) and out.dtype == np.float64


def test_features_are_order_one_for_kid(feats):
    # KID's kernel (x.y / D + 1)^3 is scale-sensitive: features are scaled to RMS 1 on the train split
    assert np.sqrt((feats["train"] ** 2).mean()) == pytest.approx(1.0, rel=1e-4)


def test_fid_self_zero_real_small_noise_large(feats):
    ftr, fte = feats["train"], feats["test"]
    assert abs(fid_from_features(ftr, ftr)) < 1e-3
    real = fid_from_features(ftr, fte)
    g = torch.Generator().manual_seed(0)
    noise = extract_features(torch.rand(360, 1, 8, 8, generator=g), load_feature_net())
    fake = fid_from_features(ftr, noise)
    assert real < 0.05 * fake, (real, fake)


def test_fid_matches_cleanfid_and_is_symmetric(feats):
    from cleanfid.fid import fid_from_feats

    ftr, fte = feats["train"], feats["test"]
    assert fid_from_features(ftr, fte) == pytest.approx(fid_from_feats(ftr, fte), rel=1e-9)
    assert fid_from_features(ftr, fte) == pytest.approx(fid_from_features(fte, ftr), rel=1e-6)


def test_kid_is_seeded_and_separates(feats):
    ftr, fte = feats["train"], feats["test"]
    state = np.random.get_state()
    a = kid_from_features(ftr, fte, num_subsets=10, seed=1)
    assert a == kid_from_features(ftr, fte, num_subsets=10, seed=1)
    assert np.array_equal(np.random.get_state()[1], state[1])  # the global RNG is left alone
    noise = extract_features(torch.rand(360, 1, 8, 8, generator=torch.Generator().manual_seed(0)))
    assert abs(a) < 0.05 * kid_from_features(ftr, noise, num_subsets=10)


def test_distances_reject_bad_shapes():
    with pytest.raises(ValueError, match="same D"):
        fid_from_features(np.zeros((10, 4)), np.zeros((10, 5)))
    with pytest.raises(ValueError, match="at least 2"):
        kid_from_features(np.zeros((1, 4)), np.zeros((10, 4)))


def test_works_through_cleanfid_model_path(net, feats):
    """clean-fid's own generator path (no 299 resize, CPU) gives the same features."""
    from cleanfid.fid import get_model_features

    images = to_unit(load_digits_images("test")) * 255.0
    batch, cursor = 40, [0]

    def generator(z: torch.Tensor) -> torch.Tensor:  # clean-fid calls G(z) -> NCHW in [0, 255]
        i = cursor[0]
        cursor[0] += z.shape[0]
        return images[i : i + z.shape[0]]

    out = get_model_features(
        generator, net, num_gen=images.shape[0], batch_size=batch, z_dim=1,
        device=torch.device("cpu"), verbose=False, custom_fn_resize=lambda img: img,
    )
    assert out.shape == feats["test"].shape
    np.testing.assert_allclose(out, feats["test"], rtol=1e-4, atol=1e-4)


def test_save_load_round_trip(tmp_path, net):
    save_feature_net(net, tmp_path / "f", {"note": "x"})
    again = load_feature_net(tmp_path / "f")
    u = to_unit(load_digits_images("test")[:8])
    torch.testing.assert_close(again(u * 255), net(u * 255))
    assert json.loads((tmp_path / "f" / "config.json").read_text())["note"] == "x"
    with pytest.raises(FileNotFoundError):
        load_feature_net(tmp_path / "missing")
