"""The one FID / KID reference policy: which features and which reference set a model's samples meet.

Used by the sweep (`search.evaluators.fid_inputs`, objective and held-out FID) and by `stridelab evaluate`,
so one model gets one FID for the same seeds in both.

``auto`` resolves, per model:

    ====================================  ==========  ===========================================================
    model                                 features    reference
    ====================================  ==========  ===========================================================
    analytic (can draw exact data, gmm)   ``pixels``  ``model``: `MODEL_REF_DRAWS` draws, seeds from `MODEL_REF_SEED0`
    digits-shaped ``[1, 8, 8]``           ``digits``  ``digits:all`` (the bundled digits, every split)
    anything else                         by shape    none: an explicit reference is needed
    ====================================  ==========  ===========================================================

Analytic mixtures are compared on raw values even when shaped 8x8 (``gmm:blobs64`` is not digits), and
their reference draws do not depend on how many samples are evaluated or from which seed: the reference
is a property of the model, not of the run.
"""

from __future__ import annotations

from typing import Any

from pipeline.errors import StridelabError
from pipeline.metrics import fid

MODEL_REF_SEED0 = 10_000_000
"""First seed of an analytic model's reference draws (far from any sampling seed a run uses)."""
MODEL_REF_DRAWS = 2_000
"""Exact data draws in an analytic model's reference set."""
DIGITS_SHAPE = (1, 8, 8)


def can_draw_data(model: Any) -> bool:
    """Whether the model's denoiser can draw exact data of its own distribution (``sample_data(seeds)``), as
    analytic mixtures can. The bundled digits models also have ``sample_data`` (real images, for the inversion
    round trip; ``sample_data_is_a_dataset``): a finite dataset, not the model's distribution, so their FID
    keeps the digits features and reference."""
    d = model.denoiser
    return callable(getattr(d, "sample_data", None)) and not getattr(d, "sample_data_is_a_dataset", False)


def auto_features(model: Any) -> str:
    """The feature extractor ``auto`` means for `model` (module docstring)."""
    return "pixels" if can_draw_data(model) else fid.default_features(model.sample_shape)


def auto_reference(model: Any) -> str:
    """The reference spec ``auto`` means for `model`; raises `StridelabError` where there is none."""
    if can_draw_data(model):
        return "model"
    if tuple(model.sample_shape) == DIGITS_SHAPE:
        return "digits"
    raise StridelabError(f"no automatic FID reference for {model.spec} (samples {list(model.sample_shape)}): it "
                         "cannot draw data and is not digits-shaped; name one (cleanfid:NAME:RES[:SPLIT])")


def build_reference(model: Any, spec: str, features: str, kid: bool = False) -> fid.Reference:
    """The reference set `spec` (``digits[:SPLIT]``, ``model``, ``cleanfid:NAME:RES[:SPLIT]``) in `features`.

    Args:
        kid: also keep the reference feature rows KID needs (clean-fid sets load them separately).
    """
    kind, ref_args = fid.parse_reference(spec)
    if (kind == "cleanfid") != (features == "inception"):
        raise StridelabError(f"FID reference {spec} and features {features} do not match: clean-fid references "
                             "need inception features and inception features need a clean-fid reference")
    if kind == "digits":
        return fid.digits_reference(ref_args[0], features)
    if kind == "model":
        if not can_draw_data(model):
            raise StridelabError(f"FID reference model: {model.spec} cannot draw data; use digits or cleanfid:...")
        data = model.denoiser.sample_data(range(MODEL_REF_SEED0, MODEL_REF_SEED0 + MODEL_REF_DRAWS))
        return fid.model_reference(model.to_unit(data), features)
    fid.ensure_inception_weights()
    return fid.cleanfid_reference(ref_args[0], int(ref_args[1]), ref_args[2], kid=kid)


def fid_inputs(model: Any, features: str = "auto", reference: str = "auto",
               kid: bool = False) -> tuple[str, fid.Reference]:
    """(feature extractor spec, reference set) for FID / KID on `model`; ``auto`` as in the module docstring."""
    features = auto_features(model) if features == "auto" else features
    fid.parse_features(features)
    spec = auto_reference(model) if reference == "auto" else reference
    return features, build_reference(model, spec, features, kid=kid)
