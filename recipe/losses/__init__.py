"""Losses: DBiLD (its PyTorch reference and the fused Triton kernels), the baselines, and the objective.

    divergence.py  D(ref, trainee): picks the kind (dbild | bild | kl) and DBiLD's implementation
    dbild.py       the PyTorch reference of DBiLD, BiLD and vanilla KD
    objective.py   L = w_ce * CE + w_align * D(z_T, z_S) + w_vsd * D(z_T, z_SW)
"""
from recipe.losses.dbild import bild_loss, dbild_loss_torch, kl_loss
from recipe.losses.divergence import dbild_loss, divergence

__all__ = ["bild_loss", "dbild_loss", "dbild_loss_torch", "divergence", "kl_loss"]
