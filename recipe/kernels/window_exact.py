"""The exact fallback of the window: `_dbild_window_exact_kernel` rereads only the windows that the lane
kernel (recipe/kernels/window_lanes.py) could not settle (a crowded lane, more than CAP tied candidates,
+0.0 at the threshold, a NaN in the row), by an exact streaming top-C over blocks of the row, and ends
in `window._finish_window` like the lane kernel. Its sizes: DBiLDTuning.exact_cap and exact_block.
"""
from __future__ import annotations

import triton
import triton.language as tl

from recipe.kernels.window import (
    _candidate_key_index,
    _candidate_key_value,
    _finish_window,
    _program_input,
    _sorted_candidates,
)


@triton.jit
def _max_nan_combine(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _block_max(x, INTERP: tl.constexpr):
    """Max of a block where any NaN wins (torch.topk ranks NaN first, so a NaN must not be skipped)."""
    if INTERP:
        m = tl.max(x, axis=0)  # numpy's max already propagates NaN
    else:
        m = tl.reduce(x, 0, _max_nan_combine)
    return m


@triton.jit
def _compact(row_ptr, buf_ptr, fill, C, CAP: tl.constexpr, INTERP: tl.constexpr):
    """Keep the top C of the candidate list (called only with fill > C) and return the new threshold:
    the C-th largest value. Later elements equal to it lose the tie on index, so `x > thr` is exact."""
    key = _sorted_candidates(row_ptr, buf_ptr, fill, CAP, INTERP)
    slot = tl.arange(0, CAP)
    tl.store(buf_ptr + slot, _candidate_key_index(key), mask=slot < C)
    thr = _candidate_key_value(tl.sum(tl.where(slot == C - 1, key, 0), axis=0))
    return tl.minimum(fill, C), thr


@triton.jit
def _absorb_block(x, start, fill, thr, row_ptr, buf_ptr, V, C,
                  CAP: tl.constexpr, SUB: tl.constexpr, BLOCK: tl.constexpr, MASKED: tl.constexpr,
                  INTERP: tl.constexpr):
    """Append the indices of the block [start, start + BLOCK) whose values may be in the top C.

    `~(x <= thr)` is "x > thr or unordered": NaN logits always qualify, and thr = NaN (list not yet
    full) lets everything in, -inf included.
    """
    offs = start + tl.arange(0, BLOCK)
    if MASKED:
        go = True
    else:
        # The hot path: one max per element. For real logits most blocks after the first few have
        # nothing to add and stop here.
        go = ~(_block_max(x, INTERP) <= thr)
    if go:
        qual = ~(x <= thr)
        if MASKED:
            qual = qual & (offs < V)
        nq = tl.sum(qual.to(tl.int32), axis=0)
        if fill + nq <= CAP:
            pos = fill + tl.cumsum(qual.to(tl.int32), axis=0) - 1
            tl.store(buf_ptr + pos, offs, mask=qual)
            fill = fill + nq
        else:
            # Too many for the free slots (the first block, or a rising row): go in sub-blocks small
            # enough (SUB <= CAP - C) to always fit after one compaction. Reloads hit L1/L2.
            for s in range(0, BLOCK, SUB):
                offs_s = start + s + tl.arange(0, SUB)
                if MASKED:
                    inb = offs_s < V
                    xs = tl.load(row_ptr + offs_s, mask=inb, other=0.0).to(tl.float32)
                    q = ~(xs <= thr) & inb
                else:
                    xs = tl.load(row_ptr + offs_s).to(tl.float32)
                    q = ~(xs <= thr)
                n = tl.sum(q.to(tl.int32), axis=0)
                if fill + n > CAP:
                    fill, thr = _compact(row_ptr, buf_ptr, fill, C, CAP, INTERP)
                    if MASKED:
                        q = ~(xs <= thr) & inb
                    else:
                        q = ~(xs <= thr)
                    n = tl.sum(q.to(tl.int32), axis=0)
                pos = fill + tl.cumsum(q.to(tl.int32), axis=0) - 1
                tl.store(buf_ptr + pos, offs_s, mask=q)
                fill = fill + n
    return fill, thr


@triton.jit
def _dbild_window_exact_kernel(x0_ptr, x1_ptr, stride0, stride1, first_slot, V, C, c_minus_1, K_MIN, K_MAX,
                               scratch_ptr, idx_out_ptr, k_out_ptr, ok_ptr, thr_ptr,
                               CAP: tl.constexpr, SUB: tl.constexpr, BLOCK: tl.constexpr,
                               KM: tl.constexpr, INTERP: tl.constexpr):
    """The windows `_dbild_window_kernel` could not settle (ok == 0), by an exact streaming top-C:
    a candidate list of CAP indices per row, appended to when a block beats the threshold (the C-th
    largest kept so far) and compacted (sort, keep C, raise the threshold) when it would overflow.
    The threshold starts at thr (from the lane kernel: every element >= its t qualifies, and at least
    C do), or with NaN there at "no bound yet"."""
    x_row, win = _program_input(x0_ptr, x1_ptr, stride0, stride1, first_slot)
    if tl.load(ok_ptr + win) == 0:
        buf = scratch_ptr + win * CAP
        fill = tl.zeros((), dtype=tl.int32)
        thr = tl.load(thr_ptr + win)  # NaN: no bound yet, every element qualifies
        n_full = V // BLOCK
        lane = tl.arange(0, BLOCK)
        for b in range(0, n_full):
            start = b * BLOCK
            x = tl.load(x_row + start + lane).to(tl.float32)
            fill, thr = _absorb_block(x, start, fill, thr, x_row, buf, V, C, CAP, SUB, BLOCK, False, INTERP)
        start = n_full * BLOCK
        if start < V:
            offs = start + lane
            x = tl.load(x_row + offs, mask=offs < V, other=0.0).to(tl.float32)
            fill, thr = _absorb_block(x, start, fill, thr, x_row, buf, V, C, CAP, SUB, BLOCK, True, INTERP)
        _finish_window(x_row, buf, fill, C, c_minus_1, K_MIN, K_MAX, idx_out_ptr + win * KM, k_out_ptr + win,
                       CAP, KM, INTERP)
