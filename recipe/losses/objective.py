"""The Switch-KD objective (docs/method.md, "Objective"):

    L = w_ce * CE(z_S, labels) + w_align * D(z_T, z_S) + w_vsd * D(z_T, z_SW)
"""
from __future__ import annotations

import torch

from recipe.losses.head import loss_sums


def switch_kd_objective(passes, cfg) -> dict[str, torch.Tensor]:
    """The loss terms of one micro-batch from its passes (recipe.models.PassOutputs) and the loss config.

    Each term is a mean over the supervised tokens of the micro-batch (VSD: of its image samples). The LM
    heads and the terms run over chunks of `cfg.chunk_rows` rows (recipe/losses/head.py).
    Returns loss (the weighted total), ce, align, vsd and the row counts; absent terms are 0.
    """
    sums = loss_sums(passes, cfg)
    ce, align, vsd = sums.ce / max(sums.rows, 1), sums.align / max(sums.rows, 1), sums.vsd / max(sums.vsd_rows, 1)
    total = cfg.ce_weight * ce + cfg.align_weight * align + cfg.vsd_weight * vsd
    if passes.anchor is not None:
        total = total + passes.anchor
    return {"loss": total, "ce": ce.detach(), "align": align.detach(), "vsd": vsd.detach(),
            "rows": torch.tensor(sums.rows), "vsd_rows": torch.tensor(sums.vsd_rows)}
