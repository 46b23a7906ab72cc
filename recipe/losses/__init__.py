"""Losses: DBiLD (with its torch reference and fused Triton implementation), the baselines, the objective."""
from __future__ import annotations

import torch

from recipe.losses.dbild import bild_loss, dbild_loss_torch, kl_loss

IMPLEMENTATIONS = ("auto", "torch", "triton")


def dbild_loss(ref: torch.Tensor, trainee: torch.Tensor, *, candidates: int = 64, k_min: int = 2,
               k_max: int | None = None, temperature: float = 3.0, impl: str = "auto") -> torch.Tensor:
    """DBiLD(ref, trainee) of SPEC.md: mean over rows (supervised tokens) of teacher-led + student-led
    reverse KL between pair-difference softmaxes. `ref` gets no gradient.

    impl: "torch" (the reference), "triton" (fused kernel; on CPU only under TRITON_INTERPRET=1), or
    "auto" (triton for CUDA tensors when triton is importable, else torch).
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
    if impl == "auto":
        from recipe.kernels import triton_available
        impl = "triton" if trainee.is_cuda and triton_available() else "torch"
    if impl == "triton":
        from recipe.kernels import dbild_loss_triton
        return dbild_loss_triton(ref, trainee, candidates=candidates, k_min=k_min, k_max=k_max,
                                 temperature=temperature)
    return dbild_loss_torch(ref, trainee, candidates=candidates, k_min=k_min, k_max=k_max,
                            temperature=temperature)


__all__ = ["dbild_loss", "dbild_loss_torch", "bild_loss", "kl_loss"]
