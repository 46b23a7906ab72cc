"""D(ref, trainee) of the alignment and VSD terms: the one place that picks the divergence (`loss.kind`)
and, for DBiLD, its implementation (`loss.impl`). docs/method.md, "DBiLD" and "Baselines".

All of them take (rows, vocab) logits, one row per supervised token, give a mean over rows, and send no
gradient to `ref`.
"""
from __future__ import annotations

import torch

from recipe.config import DivergenceKind, LossImpl, choices
from recipe.losses.dbild import bild_loss, dbild_loss_torch, kl_loss


def dbild_loss(ref: torch.Tensor, trainee: torch.Tensor, *, candidates: int = 64, k_min: int = 2,
               k_max: int | None = None, temperature: float = 3.0, impl: LossImpl = "auto") -> torch.Tensor:
    """DBiLD(ref, trainee): mean over rows of teacher-led + student-led reverse KL between the pair-difference
    softmaxes of each row's leading set.

    impl: "torch" (the reference, recipe/losses/dbild.py), "triton" (the fused kernels, recipe/kernels; on
    the CPU only under TRITON_INTERPRET=1), or "auto" (triton for CUDA tensors when triton is importable).
    """
    if impl not in choices(LossImpl):
        raise ValueError(f"impl must be one of {choices(LossImpl)}, got {impl!r}")
    if impl == "auto":
        from recipe.kernels import triton_available
        impl = "triton" if trainee.is_cuda and triton_available() else "torch"
    if impl == "triton":
        from recipe.kernels import dbild_loss_triton
        return dbild_loss_triton(ref, trainee, candidates=candidates, k_min=k_min, k_max=k_max,
                                 temperature=temperature)
    return dbild_loss_torch(ref, trainee, candidates=candidates, k_min=k_min, k_max=k_max, temperature=temperature)


def divergence(ref: torch.Tensor, trainee: torch.Tensor, cfg) -> torch.Tensor:
    """D(ref, trainee) as the loss config (recipe.config.LossConfig) chooses it."""
    if cfg.kind == "dbild":
        return dbild_loss(ref, trainee, candidates=cfg.candidates, k_min=cfg.k_min, k_max=cfg.k_max,
                          temperature=cfg.temperature, impl=cfg.impl)
    if cfg.kind == "bild":
        return bild_loss(ref, trainee, top_k=cfg.bild_top_k, temperature=cfg.temperature)
    if cfg.kind == "kl":
        return kl_loss(ref, trainee, temperature=cfg.temperature)
    raise ValueError(f"loss.kind = {cfg.kind!r}; valid: {list(choices(DivergenceKind))}")
