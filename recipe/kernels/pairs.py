"""The pair loss of DBiLD (docs/method.md, DBiLD step 3) and its gradient, on the windows' leading indices.

`_dbild_pairs_kernel` gathers both models' logits at each branch's leading indices (the first k of
the ref-led and of the trainee-led window), builds the pair-difference softmaxes over i < j < k on a
16, 32 or KM-wide tile (the smallest holding k), the reverse KL and, when the trainee needs a
gradient, d loss_row / d (gathered trainee logits): all the backward needs.

Backward: `_dbild_scatter_kernel` writes those <= 2 * k_max values per row into a zeroed gradient in the
trainee's dtype, adding the two branches in float32 where their leading sets share an entry.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _pair_branch(r_row, t_row, idx_ptr, k, loss_ptr, g_ptr, inv_tau,
                 KM: tl.constexpr, NEED_GRAD: tl.constexpr):
    """One branch of one row on a KM x KM tile of pairs (KM >= k); g_ptr gets KM entries."""
    a = tl.arange(0, KM)
    used = a < k
    idx = tl.load(idx_ptr + a, mask=used, other=0)
    zr = tl.load(r_row + idx, mask=used, other=0.0).to(tl.float32)
    zt = tl.load(t_row + idx, mask=used, other=0.0).to(tl.float32)
    pair = (a[:, None] < a[None, :]) & used[None, :]  # i < j < k
    dr = (zr[:, None] - zr[None, :]) * inv_tau
    dt = (zt[:, None] - zt[None, :]) * inv_tau
    # Masked pairs become -inf before exp (exp -> 0) and 0 before any product: no NaN can leak.
    mr = tl.max(tl.max(tl.where(pair, dr, float("-inf")), axis=1), axis=0)
    mt = tl.max(tl.max(tl.where(pair, dt, float("-inf")), axis=1), axis=0)
    # Shifted by the maxima first (as log_softmax does): exact for the leading pairs however large the
    # logit gaps, where d - (m + log s) would lose ulp(|d|) (1e-3 at gaps of 1e4).
    xr = dr - mr
    xt = dt - mt
    # No pair at all (k < 2: a vocabulary of one) leaves the sums 0: loss and gradient 0, as in the reference.
    # (Otherwise a sum is >= 1 or NaN, which must stay NaN: hence == 0, not a maximum.)
    sr = tl.sum(tl.sum(tl.exp(tl.where(pair, xr, float("-inf"))), axis=1), axis=0)
    sr = tl.where(sr == 0, 1.0, sr)
    et = tl.exp(tl.where(pair, xt, float("-inf")))
    st = tl.sum(tl.sum(et, axis=1), axis=0)
    st = tl.where(st == 0, 1.0, st)
    # log p_t - log p_r = (x_t - log s_t) - (x_r - log s_r)
    log_ratio = tl.where(pair, (xt - xr) - (tl.log(st) - tl.log(sr)), 0.0)
    p_t = et / st
    loss = tl.sum(tl.sum(p_t * log_ratio, axis=1), axis=0)
    tl.store(loss_ptr, loss)
    if NEED_GRAD:
        # d KL(p_t || p_r) / d d_t = p_t * (log p_t - log p_r - KL); d_t(i,j) = (z_i - z_j) / tau.
        gd = p_t * (log_ratio - loss)
        g = (tl.sum(gd, axis=1) - tl.sum(gd, axis=0)) * inv_tau
        tl.store(g_ptr + a, tl.where(used, g, 0.0))


@triton.jit
def _dbild_pairs_kernel(ref_ptr, trn_ptr, stride_r, stride_t, idx_ptr, k_ptr, loss_ptr, g_ptr, inv_tau,
                        KM: tl.constexpr, NEED_GRAD: tl.constexpr):
    """Both branches of one row: loss_ptr gets the (rows, 2) branch losses, g_ptr (if NEED_GRAD) the
    (rows, 2, KM) gradients with respect to the gathered trainee logits."""
    row = tl.program_id(0).to(tl.int64)
    r_row = ref_ptr + row * stride_r
    t_row = trn_ptr + row * stride_t
    # A real loop (not static_range): one branch's tiles live at a time, halving registers.
    for br in range(0, 2):
        slot = row * 2 + br
        k = tl.load(k_ptr + slot)
        idx_b, loss_b, g_b = idx_ptr + slot * KM, loss_ptr + slot, g_ptr + slot * KM
        # The knee usually leaves k far below k_max: use the smallest of 16 / 32 / KM that holds k
        # (the work is quadratic in the tile). Entries of g past the tile are never read (masked by k).
        # `KM > 16 and ...` is decided at compile time where KM is too small: no code for that tile.
        if KM > 16 and k <= 16:
            _pair_branch(r_row, t_row, idx_b, k, loss_b, g_b, inv_tau, 16, NEED_GRAD)
        else:
            if KM > 32 and k <= 32:
                _pair_branch(r_row, t_row, idx_b, k, loss_b, g_b, inv_tau, 32, NEED_GRAD)
            else:
                _pair_branch(r_row, t_row, idx_b, k, loss_b, g_b, inv_tau, KM, NEED_GRAD)


@triton.jit
def _dbild_scatter_kernel(grad_ptr, stride_g, idx_ptr, k_ptr, g_ptr, grad_out_ptr, inv_rows,
                          KM: tl.constexpr):
    """d loss / d trainee for one row: grad_out / rows times the gathered gradients of both branches,
    stored at their leading indices (the rest of the row stays zero)."""
    row = tl.program_id(0).to(tl.int64)
    a = tl.arange(0, KM)
    base = row * 2 * KM
    k1 = tl.load(k_ptr + row * 2)
    k2 = tl.load(k_ptr + row * 2 + 1)
    u1 = a < k1
    u2 = a < k2
    i1 = tl.load(idx_ptr + base + a, mask=u1, other=-1)
    i2 = tl.load(idx_ptr + base + KM + a, mask=u2, other=-2)
    g1 = tl.load(g_ptr + base + a, mask=u1, other=0.0)
    g2 = tl.load(g_ptr + base + KM + a, mask=u2, other=0.0)
    scale = tl.load(grad_out_ptr).to(tl.float32) * inv_rows
    # Both leading sets may hold the same vocabulary entry: add in float32 here and write each entry
    # once, instead of two read-modify-writes (or atomics) on the low-precision gradient.
    same = (i1[:, None] == i2[None, :]) & u1[:, None] & u2[None, :]
    g1 = g1 + tl.sum(tl.where(same, g2[None, :], 0.0), axis=1)
    dup2 = tl.max(same.to(tl.int32), axis=0) > 0
    out = grad_ptr + row * stride_g
    tl.store(out + i1, (g1 * scale).to(grad_ptr.dtype.element_ty), mask=u1)
    tl.store(out + i2, (g2 * scale).to(grad_ptr.dtype.element_ty), mask=u2 & ~dup2)
