"""How smooth an interpolation path is, measured on its decoded frames' features.

For frames f_0 .. f_{F-1} (features [F, D]) whose keys sit every `frames - 1` frames:

=================  ==================================================================================
``mean_step``      mean of |f_{i+1} - f_i| over consecutive frames
``max_step``       the largest consecutive distance (one jump in an otherwise smooth morph shows here)
``chord``          sum over segments of the distance between their two key frames
``length_ratio``   path length (sum of steps) / chord: 1 for frames evenly on a straight line, larger
                   when the morph wanders away from the direct route
``max_jump``       max_step / (chord / number of steps): the largest step against the even step a straight
                   path would take; 1 is perfectly even, large values a sudden switch
=================  ==================================================================================

Lower is smoother on every figure; all are in the feature space's units (the digits feature network for
the bundled models), so schedules are compared on the same seeds and frames.
"""

from __future__ import annotations

import numpy as np

from pipeline.errors import StridelabError


def path_smoothness(features: np.ndarray, frames: int) -> dict[str, float]:
    """The figures of the module docstring for features [F, D] of F = (M - 1) (frames - 1) + 1 frames."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or frames < 2 or (len(f) - 1) % (frames - 1) or len(f) < frames:
        raise StridelabError(f"features must be [(M - 1) (frames - 1) + 1, D] for M >= 2 keys, got {f.shape} "
                             f"with frames = {frames}")
    steps = np.linalg.norm(np.diff(f, axis=0), axis=1)
    keys = f[:: frames - 1]
    chord = float(np.linalg.norm(np.diff(keys, axis=0), axis=1).sum())
    length = float(steps.sum())
    even = chord / len(steps) if chord > 0 else float("nan")
    return {"mean_step": float(steps.mean()), "max_step": float(steps.max()), "chord": chord,
            "length_ratio": length / chord if chord > 0 else float("nan"), "max_jump": float(steps.max()) / even}
