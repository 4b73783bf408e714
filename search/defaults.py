"""Defaults of `stridelab sweep`, importable without torch/optuna (the CLI builds its parser from them)."""

DEFAULT_MODEL = "gmm:blobs64"
"""The default sweep's model. Switch to ``bundled:digits`` once `pipeline.models` ships it."""

DEFAULTS = {
    "nfe": 10,
    "trials": 60,
    "parallel": 4,
    "sampler": "tpe",
    "space": "warp",
    "objective": "recon",
    "fid_weight": 1.0,
    "num_seeds": 512,
    "holdout_seeds": 512,
    "seed": 0,
    "screen_seeds": 0,
    "actors": 2,
}
"""Flag defaults shared by `search.sweep.SweepConfig` and `jobs.sweep`."""
