"""DBiLD (Dynamic Bi-directional Logits Difference) and the BiLD / KL baselines, in plain PyTorch.

This file is the reference: docs/method.md ("DBiLD") is the definition, and every faster
implementation (recipe/kernels) is tested against `dbild_loss_torch`. Shapes: one row per supervised
token, one column per vocabulary entry. Arithmetic runs in float32 (float64 if given float64).

Ties: inside the candidate window equal logits are ordered by vocabulary index (lowest first). Which of
several equal logits enters a window that is too small to hold them all is left to torch.topk.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def candidate_window(lead: torch.Tensor, candidates: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `candidates` largest logits of each row, descending, ties by ascending vocabulary index."""
    values, indices = torch.topk(lead, candidates, dim=-1, sorted=True)
    # topk's order among equal values is unspecified: make it (value desc, index asc) so that every
    # implementation picks the same leading set.
    order = torch.argsort(indices, dim=-1)
    values, indices = values.gather(-1, order), indices.gather(-1, order)
    order = torch.argsort(values, dim=-1, descending=True, stable=True)
    return values.gather(-1, order), indices.gather(-1, order)


def knee_k(window: torch.Tensor, k_min: int, k_max: int) -> torch.Tensor:
    """k per row from the Kneedle knee of a descending window (rows, C): docs/method.md, DBiLD step 2.

    The knee is the point farthest BELOW the chord from the first to the last point, so a steep
    (confident) row gets a small k and a flat row a large one.
    """
    w = window.to(_compute_dtype(window))
    count = w.shape[-1]
    first, last = w[:, :1], w[:, -1:]
    span = first - last
    # A flat window (span 0) gives y = 0 everywhere, hence knee 0 and k = k_min.
    y = torch.where(span > 0, (w - last) / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(w))
    # Divide by a tensor: CUDA turns division by a Python scalar into multiplication by its reciprocal,
    # which moves x by one ulp and, on windows with tied values, the first argmax with it.
    x = torch.arange(count, device=w.device, dtype=w.dtype) / torch.full((), count - 1, device=w.device, dtype=w.dtype)
    knee = torch.argmax((1.0 - x) - y, dim=-1)  # argmax returns the first maximal index
    return torch.clamp(knee + 1, min=k_min, max=k_max)


def _pair_log_probs(leading_logits: torch.Tensor, pair_mask: torch.Tensor, temperature: float):
    """Log-softmax over the valid pairs (i < j < k) of the logit differences of one model.

    Masked pairs get finite values and zero probability, so no NaN reaches any gradient. The differences
    are shifted by their (constant) maximum before the normaliser is subtracted, as log_softmax does:
    `d - logsumexp(d)` would round the leading pairs' log-probabilities to ulp(max d).
    """
    diffs = (leading_logits[:, :, None] - leading_logits[:, None, :]) / temperature
    peak = diffs.masked_fill(~pair_mask, float("-inf")).amax(dim=(1, 2), keepdim=True).detach()
    shifted = (diffs - peak).masked_fill(~pair_mask, 0.0)
    log_norm = shifted.masked_fill(~pair_mask, float("-inf")).exp().sum(dim=(1, 2), keepdim=True).log()
    return shifted - log_norm


def pair_mask_for(k: torch.Tensor, k_max: int) -> torch.Tensor:
    """(rows, k_max, k_max) bool: pair (i, j) is used when i < j < k of its row."""
    pos = torch.arange(k_max, device=k.device)
    upper = pos[:, None] < pos[None, :]
    return upper[None] & (pos[None, None, :] < k[:, None, None])


def branch_loss(
    ref: torch.Tensor,
    trainee: torch.Tensor,
    leading_indices: torch.Tensor,
    k: torch.Tensor,
    temperature: float,
    reverse: bool = True,
) -> torch.Tensor:
    """Per-row divergence between the pair softmaxes of ref and trainee on one leading set.

    reverse=True: KL(p_trainee || p_ref) (DBiLD); reverse=False: KL(p_ref || p_trainee) (BiLD).
    """
    dtype = _compute_dtype(trainee)
    pair_mask = pair_mask_for(k, leading_indices.shape[-1])
    log_p_ref = _pair_log_probs(ref.gather(-1, leading_indices).to(dtype), pair_mask, temperature)
    log_p_trn = _pair_log_probs(trainee.gather(-1, leading_indices).to(dtype), pair_mask, temperature)
    log_p, log_q = (log_p_trn, log_p_ref) if reverse else (log_p_ref, log_p_trn)
    terms = torch.where(pair_mask, log_p.exp() * (log_p - log_q), torch.zeros_like(log_p))
    return terms.sum(dim=(1, 2))


def dbild_branches_torch(
    ref: torch.Tensor,
    trainee: torch.Tensor,
    *,
    candidates: int = 64,
    k_min: int = 2,
    k_max: int | None = None,
    temperature: float = 3.0,
) -> dict[str, torch.Tensor]:
    """Per-row teacher-led and student-led losses and their k (for tests and diagnostics)."""
    ref = ref.detach()
    candidates = min(candidates, ref.shape[-1])
    k_max = candidates if k_max is None else min(k_max, candidates)
    out = {}
    for name, lead in (("ref_led", ref), ("trainee_led", trainee.detach())):
        window, indices = candidate_window(lead, candidates)
        k = knee_k(window, k_min, k_max)
        out[f"{name}_k"] = k
        out[f"{name}_loss"] = branch_loss(ref, trainee, indices[:, :k_max], k, temperature)
    return out


def check_logits(ref: torch.Tensor, trainee: torch.Tensor, candidates: int, k_min: int, k_max: int | None):
    if ref.shape != trainee.shape or ref.dim() != 2:
        raise ValueError(f"DBiLD needs two (rows, vocab) logit tensors of one shape, got {tuple(ref.shape)} "
                         f"and {tuple(trainee.shape)}")
    if candidates < 2 or k_min < 2:
        raise ValueError(f"candidates ({candidates}) and k_min ({k_min}) must be at least 2: a pair needs two logits")
    if k_max is not None and k_max < k_min:
        raise ValueError(f"k_max ({k_max}) must be >= k_min ({k_min})")


def dbild_loss_torch(ref, trainee, *, candidates=64, k_min=2, k_max=None, temperature=3.0) -> torch.Tensor:
    """Mean over rows of L_t + L_s (docs/method.md). A zero-row input gives 0 with a gradient path."""
    check_logits(ref, trainee, candidates, k_min, k_max)
    if ref.shape[0] == 0:
        return trainee.sum() * 0.0
    parts = dbild_branches_torch(ref, trainee, candidates=candidates, k_min=k_min, k_max=k_max,
                                 temperature=temperature)
    return (parts["ref_led_loss"] + parts["trainee_led_loss"]).mean()


def bild_loss(ref: torch.Tensor, trainee: torch.Tensor, *, top_k: int = 8, temperature: float = 3.0) -> torch.Tensor:
    """BiLD baseline (Li et al., 2024): fixed top-k leading sets, forward KL on the pair softmaxes."""
    check_logits(ref, trainee, top_k, 2, None)
    if ref.shape[0] == 0:
        return trainee.sum() * 0.0
    ref = ref.detach()
    top_k = min(top_k, ref.shape[-1])
    k = torch.full((ref.shape[0],), top_k, device=ref.device, dtype=torch.long)
    total = 0.0
    for lead in (ref, trainee.detach()):
        _, indices = candidate_window(lead, top_k)
        total = total + branch_loss(ref, trainee, indices, k, temperature, reverse=False)
    return total.mean()


def kl_loss(ref: torch.Tensor, trainee: torch.Tensor, *, temperature: float = 3.0,
            chunk_rows: int = 1024) -> torch.Tensor:
    """Vanilla KD (Hinton et al.): forward KL(p_ref || p_trainee) over the full vocabulary at
    temperature tau, times tau^2, mean over rows. Rows are processed in chunks to bound the
    (rows x vocab) float32 temporaries."""
    if ref.shape != trainee.shape or ref.dim() != 2:
        raise ValueError(f"kl_loss needs two (rows, vocab) tensors of one shape, got {tuple(ref.shape)}, "
                         f"{tuple(trainee.shape)}")
    if ref.shape[0] == 0:
        return trainee.sum() * 0.0
    dtype = _compute_dtype(trainee)
    total = trainee.new_zeros((), dtype=dtype)
    for start in range(0, ref.shape[0], chunk_rows):
        r = F.log_softmax(ref[start:start + chunk_rows].detach().to(dtype) / temperature, dim=-1)
        q = F.log_softmax(trainee[start:start + chunk_rows].to(dtype) / temperature, dim=-1)
        total = total + F.kl_div(q, r, log_target=True, reduction="sum")
    return total * temperature ** 2 / ref.shape[0]
