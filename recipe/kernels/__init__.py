"""Fused GPU kernels (Triton). Importing this package never imports triton: `recipe.losses.dbild_loss`
asks `triton_available()` first, so machines without triton keep the torch path. The kernels and their
launch are in recipe/kernels/dbild.py (which imports triton); recipe/kernels/tuning.py (which does not)
holds their launch shapes."""
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


def dbild_loss_triton(ref, trainee, *, candidates=64, k_min=2, k_max=None, temperature=3.0, tuning=None):
    """DBiLD with the fused Triton kernels (recipe/kernels/dbild.py). tuning: a `DBiLDTuning` for
    launch shapes other than the default (benchmarks, tests)."""
    if not triton_available():
        raise RuntimeError("dbild_loss_triton needs triton and a CUDA device (or TRITON_INTERPRET=1 for CPU tensors)")
    from recipe.kernels.dbild import dbild_loss_triton as _impl

    return _impl(ref, trainee, candidates=candidates, k_min=k_min, k_max=k_max, temperature=temperature,
                 tuning=tuning)


def dbild_branches_triton(ref, trainee, *, candidates=64, k_min=2, k_max=None, temperature=3.0, tuning=None,
                          return_fast_rows=False):
    """Per-row k and branch losses from the kernels (mirrors `dbild_branches_torch`); return_fast_rows
    adds, per row, whether the lane kernel settled the trainee-led window."""
    from recipe.kernels.dbild import dbild_branches_triton as _impl

    return _impl(ref, trainee, candidates=candidates, k_min=k_min, k_max=k_max, temperature=temperature,
                 tuning=tuning, return_fast_rows=return_fast_rows)


__all__ = ["triton_available", "dbild_loss_triton", "dbild_branches_triton"]
