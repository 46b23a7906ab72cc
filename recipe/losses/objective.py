"""The Switch-KD objective: L = w_ce * CE(z_S) + w_align * D(z_T, z_S) + w_vsd * D(z_T, z_SW)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from recipe.losses import dbild_loss
from recipe.losses.dbild import bild_loss, kl_loss


def divergence(kind: str, ref: torch.Tensor, trainee: torch.Tensor, cfg) -> torch.Tensor:
    """D(ref, trainee) chosen by loss.kind; a mean over rows."""
    if kind == "dbild":
        return dbild_loss(ref, trainee, candidates=cfg.candidates, k_min=cfg.k_min, k_max=cfg.k_max,
                          temperature=cfg.temperature, impl=cfg.impl)
    if kind == "bild":
        return bild_loss(ref, trainee, top_k=cfg.bild_top_k, temperature=cfg.temperature)
    if kind == "kl":
        return kl_loss(ref, trainee, temperature=cfg.temperature)
    raise ValueError(f"loss.kind must be dbild, bild or kl, got {kind!r}")


def switch_kd_objective(passes, cfg) -> dict[str, torch.Tensor]:
    """Each term is a mean over the supervised tokens of the micro-batch (VSD: of its image samples).

    Returns loss (weighted total), ce, align, vsd and the row counts; absent terms are 0.
    """
    zero = passes.student.new_zeros((), dtype=torch.float32)
    rows = passes.student.shape[0]
    ce = F.cross_entropy(passes.student.float(), passes.targets) if rows else passes.student.sum() * 0.0
    align = vsd = zero
    if passes.teacher is not None and cfg.align_weight > 0:
        align = divergence(cfg.kind, passes.teacher, passes.student, cfg)
    if passes.switch is not None and cfg.vsd_weight > 0:
        vsd = divergence(cfg.kind, passes.teacher[passes.switch_rows], passes.switch, cfg)
    total = cfg.ce_weight * ce + cfg.align_weight * align + cfg.vsd_weight * vsd
    if passes.anchor is not None:
        total = total + passes.anchor
    vsd_rows = 0 if passes.switch is None else passes.switch.shape[0]
    return {"loss": total, "ce": ce.detach(), "align": align.detach(), "vsd": vsd.detach(),
            "rows": torch.tensor(rows), "vsd_rows": torch.tensor(vsd_rows)}
