"""The Switch-KD objective (docs/method.md, "Objective"):

    L = w_ce * CE(z_S, labels) + w_align * D(z_T, z_S) + w_vsd * D(z_T, z_SW)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from recipe.losses.divergence import divergence


def switch_kd_objective(passes, cfg) -> dict[str, torch.Tensor]:
    """The loss terms of one micro-batch from its passes (recipe.models.PassOutputs) and the loss config.

    Each term is a mean over the supervised tokens of the micro-batch (VSD: of its image samples).
    Returns loss (the weighted total), ce, align, vsd and the row counts; absent terms are 0.
    """
    student = passes.student_logits()
    rows = student.shape[0]
    ce = F.cross_entropy(student.float(), passes.targets) if rows else student.sum() * 0.0
    align = vsd = student.new_zeros((), dtype=torch.float32)
    shared = slice(0, passes.vocab)  # the id range the two models' logits are compared over
    teacher = passes.teacher_logits()[:, shared] if passes.teacher_hidden is not None else None
    if teacher is not None and cfg.align_weight > 0:
        align = divergence(teacher, student[:, shared], cfg)
    vsd_rows = 0
    if passes.switch_hidden is not None and cfg.vsd_weight > 0:
        switch = passes.switch_logits()[:, shared]
        vsd_rows = switch.shape[0]
        vsd = divergence(teacher[passes.switch_rows], switch, cfg)
    total = cfg.ce_weight * ce + cfg.align_weight * align + cfg.vsd_weight * vsd
    if passes.anchor is not None:
        total = total + passes.anchor
    return {"loss": total, "ce": ce.detach(), "align": align.detach(), "vsd": vsd.detach(),
            "rows": torch.tensor(rows), "vsd_rows": torch.tensor(vsd_rows)}
