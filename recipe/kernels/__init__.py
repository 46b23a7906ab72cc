"""Fused GPU kernels (Triton). Importing this package never imports triton: `recipe.losses.dbild_loss`
asks `triton_available()` first, so machines without triton keep the torch path."""
from __future__ import annotations

import os


def triton_available() -> bool:
    """True when triton imports and can run here: a CUDA device, or the CPU interpreter
    (TRITON_INTERPRET=1, which must be set before triton kernels are first imported)."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return True
    import torch

    return torch.cuda.is_available()


def dbild_loss_triton(ref, trainee, *, candidates=64, k_min=2, k_max=None, temperature=3.0):
    """DBiLD with the fused Triton kernels (recipe/kernels/dbild_triton.py)."""
    if not triton_available():
        raise RuntimeError("dbild_loss_triton needs triton and a CUDA device (or TRITON_INTERPRET=1 for CPU tensors)")
    from recipe.kernels.dbild_triton import dbild_loss_triton as _impl

    return _impl(ref, trainee, candidates=candidates, k_min=k_min, k_max=k_max, temperature=temperature)


def dbild_branches_triton(ref, trainee, **kwargs):
    """Per-row k and branch losses from the kernels (mirrors `dbild_branches_torch`)."""
    from recipe.kernels.dbild_triton import dbild_branches_triton as _impl

    return _impl(ref, trainee, **kwargs)


__all__ = ["triton_available", "dbild_loss_triton", "dbild_branches_triton"]
