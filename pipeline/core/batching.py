"""Fixed-shape micro-batching: a row's output never depends on the batch it came in.

Why: convolution and GEMM kernels pick their algorithm by batch shape, so on CPU (oneDNN) and GPU (cuDNN)
a sample's output can differ in the last bits between a batch of 1 and a batch of 64. Calls of one fixed
shape are per-sample exact (measured: permuting or padding a batch changes no bit of the other rows), so a
network called only on chunks of one size gives bit-identical samples at any batch size and on any number
of actors, as long as every caller uses the same size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from pipeline.errors import StridelabError

DEFAULT_FORWARD_BATCH = 64
"""The one network batch size of every evaluator (Ray workers and in-process): equal sizes, equal bits."""


def run_fixed_batches(fn: Callable[..., torch.Tensor], tensors: Sequence[torch.Tensor], size: int) -> torch.Tensor:
    """``fn(*chunks)`` on consecutive chunks of exactly `size` rows (the last padded by repeating its last
    row), outputs concatenated and trimmed. Row i's output then never depends on the batch it came in."""
    B = tensors[0].shape[0]
    if size <= 0:
        return fn(*tensors)
    outs = []
    for i in range(0, B, size):
        parts = [t[i : i + size] for t in tensors]
        n = parts[0].shape[0]
        if n < size:
            parts = [torch.cat([p, p[-1:].expand(size - n, *p.shape[1:])]) for p in parts]
        outs.append(fn(*parts)[:n])
    return torch.cat(outs) if outs else fn(*tensors)


class BatchInvariant(torch.nn.Module):
    """Call a denoiser only on batches of exactly `micro_batch` samples (see the module docstring).

    With this wrapper sample i is bit-identical at any batch size and on any number of actors, as long as
    every worker uses the same `micro_batch`. The cost is the padding of the last chunk.

    Args:
        denoiser: any eps denoiser; `alphas_cumprod` is passed through.
        micro_batch: the one batch size the network ever sees.
    """

    def __init__(self, denoiser: torch.nn.Module, micro_batch: int):
        super().__init__()
        if micro_batch < 1:
            raise StridelabError(f"micro_batch must be >= 1, got {micro_batch}")
        self.inner = denoiser
        self.micro_batch = int(micro_batch)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.inner.alphas_cumprod

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            # Expose the wrapped denoiser's extras (e.g. `sample_data` of analytic models).
            return getattr(super().__getattr__("inner"), name)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return run_fixed_batches(self.inner, [x, t], self.micro_batch)
