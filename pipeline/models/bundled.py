"""Where the bundled digits assets live."""

from __future__ import annotations

from pathlib import Path

from pipeline.io.files import atomic_directory  # noqa: F401  (re-exported for the training commands)

ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets"
DIGITS_DDPM_DIR = ASSETS_DIR / "digits" / "ddpm"
DIGITS_V_DDPM_DIR = ASSETS_DIR / "digits-v" / "ddpm"  # cosine betas, v prediction
DIGITS_FEATURES_DIR = ASSETS_DIR / "digits" / "features"


