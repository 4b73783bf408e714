"""Spherical interpolation of noise (Shoemake 1985; used on diffusion noise by Song et al. 2021, DDIM sec. 5.3).

A Gaussian x_T in D dimensions lies near the sphere of radius sqrt(D); the straight line between two
draws passes inside it (its midpoint has norm ~sqrt(D / 2)), where the model saw no noise. slerp keeps
the path on the sphere, so every frame is a plausible x_T and deterministic DDIM turns it into a morph.

    slerp(a, b, w) = sin((1 - w) theta) / sin(theta) a + sin(w theta) / sin(theta) b,
    theta = arccos(<a, b> / (|a| |b|))
"""

from __future__ import annotations

import torch

from pipeline.errors import StridelabError

PARALLEL_EPS = 1e-7
"""Below this sin(theta) the two vectors are (anti)parallel and slerp falls back to the straight line."""


def slerp(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of two noise tensors (shape [...]) at weights w [K]; returns [K, ...] (float64 math)."""
    a64, b64 = a.double().flatten(), b.double().flatten()
    cos = (a64 @ b64) / (a64.norm() * b64.norm())
    theta = torch.arccos(cos.clamp(-1.0, 1.0))
    w = w.double().reshape(-1, 1)
    if torch.sin(theta) < PARALLEL_EPS:
        out = (1 - w) * a64 + w * b64
    else:
        out = (torch.sin((1 - w) * theta) * a64 + torch.sin(w * theta) * b64) / torch.sin(theta)
    return out.reshape(-1, *a.shape).to(a.dtype)


def slerp_path(keys: torch.Tensor, frames: int) -> torch.Tensor:
    """A path through key noises [M, ...] (M >= 2): `frames` evenly weighted frames per segment, ends included
    and shared, so [(M - 1) (frames - 1) + 1, ...] in all; frame j (frames - 1) is key j."""
    if keys.ndim < 2 or keys.shape[0] < 2:
        raise StridelabError(f"needs at least 2 key noises, got {keys.shape[0] if keys.ndim else 0}", param="keys")
    if frames < 2:
        raise StridelabError(f"must be >= 2 (both ends of each segment), got {frames}", param="frames")
    w = torch.linspace(0.0, 1.0, frames, dtype=torch.float64)
    parts = [slerp(keys[j], keys[j + 1], w)[(1 if j else 0):] for j in range(keys.shape[0] - 1)]
    out = torch.cat(parts)
    out[:: frames - 1] = keys.to(out.dtype)  # the keys exactly, not their float64 round trip
    return out
