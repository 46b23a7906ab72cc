"""Fused Triton DBiLD (SPEC.md "DBiLD" and "Performance contract"); reference: recipe/losses/dbild.py.

Forward: each window launch covers (rows, both leading inputs: ref, then trainee), one program each.

1. `_dbild_window_kernel` reads the row once, as blocks of LANES logits (16-bit rows as int32 pairs),
   three blocks in flight, no branches: lane j keeps the DEPTH largest integer keys (value, then
   block, in one int32 for 16-bit inputs) of the elements j, j + LANES, ... with a min/max insertion
   network (bf16, C <= 64: 3 keys of 2048 lanes, ~9 ALU-pipe SASS instructions per logit, 5 of them
   the integer min/max). With t the C-th largest kept value, if no lane kept DEPTH keys >= t, every
   element >= t was kept: those candidates (about C) hold the exact top C, ties included. They are
   sorted as int64 (value desc, index asc) keys, then come the Kneedle knee (the reference's float32
   formula with IEEE divisions, so argmax ties agree), k, and the first k_max window indices.
   Otherwise (a crowded lane, > CAP tied candidates, +0.0 at the threshold, a NaN in the row: ~0.5-1%
   of rows for real-looking logits) the window is marked for:
2. `_dbild_window_exact_kernel`, which rereads only those rows: an exact streaming top-C with a
   candidate list of CAP = 4 * C indices, appended to (cumsum positions) when a block beats the
   threshold and compacted (sort, keep C, raise the threshold) when it would overflow. The threshold
   starts just below the lane kernel's t (a lower bound of the C-th value), so most blocks only
   take a max.
3. `_dbild_pairs_kernel` gathers both models' logits at each branch's leading indices, builds the
   pair-difference softmaxes over i < j < k on a 16, 32 or KM-wide tile (the smallest holding k),
   the reverse KL and, when the trainee needs a gradient, d loss_row / d (gathered trainee logits):
   all the backward needs.

Backward: `_dbild_scatter_kernel` writes those <= 2*k_max values per row into a zeroed gradient in the
trainee's dtype, adding the two branches in float32 where their leading sets share an entry.

Memory besides the gradient, all O(rows x candidates): scratch int32 (rows, 2, CAP), a flag and a
threshold per window, leading indices int32 (rows, 2, KM), k int32 (rows, 2), losses f32 (rows, 2),
gathered gradients f32 (rows, 2, KM), with KM = next power of two >= k_max. float64 (or other non
bf16/fp16/fp32) inputs and windows wider than MAX_TRITON_CANDIDATES run the torch reference instead.
"""
from __future__ import annotations

import contextlib
import os
import warnings

import torch
import triton
import triton.language as tl

from recipe.kernels import _interpreter_compat
from recipe.losses.dbild import check_logits, dbild_branches_torch, dbild_loss_torch

_interpreter_compat.apply()

# The pair softmax lives in registers as KM x KM tiles; above 128 it would spill, so larger windows
# (only used to check the whole-vocabulary definition on tiny vocabularies) go to the torch reference.
MAX_TRITON_CANDIDATES = 128

# Globals read by kernels must be constexprs that compare equal to themselves (Triton re-checks them
# at every launch), so no NaN here: NaN is spelled float("nan") inside the kernels.
_KEY_EMPTY = tl.constexpr(-(2**63))
_KEY32_MIN = tl.constexpr(-(2**31))
_LOW31 = tl.constexpr(0x7FFFFFFF)


# --------------------------------------------------------------------------------------------- helpers
# INTERP (a constexpr) selects, in two places, an equivalent formulation that the CPU interpreter runs
# fast: there, reductions and scans with a custom combine function run element by element in Python.
# The GPU formulation runs under the interpreter too in tests/test_kernels.py (interp_path=False).


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
def _order_key(v, idx):
    """One int64 per candidate whose descending order is (value desc, index asc), so every key is
    distinct and ties never need a second pass."""
    v = tl.where(v == 0.0, 0.0, v)  # -0.0 == +0.0 for torch; let the index decide
    v = tl.where(v != v, float("nan"), v)  # a single (positive) NaN pattern, ranked above +inf like topk
    bits = v.to(tl.int32, bitcast=True)
    ordered = tl.where(bits >= 0, bits, bits ^ _LOW31)  # monotone in the float value
    return (ordered.to(tl.int64) << 32) | (idx ^ _LOW31).to(tl.int64)  # low word: 2^31-1-idx


@triton.jit
def _key_value(key):
    ordered = (key >> 32).to(tl.int32)
    bits = tl.where(ordered >= 0, ordered, ordered ^ _LOW31)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _key_index(key):
    return key.to(tl.int32) ^ _LOW31  # the truncation keeps the low word


@triton.jit
def _sort_desc(key, CAP: tl.constexpr, INTERP: tl.constexpr):
    if not INTERP:
        key = tl.sort(key, descending=True)
    else:
        # Same result for distinct keys, by rank placement in O(CAP^2). Only for the CPU interpreter,
        # where tl.sort's bitonic network (custom-combine reductions) runs element by element in Python.
        slot = tl.arange(0, CAP)
        rank = tl.sum((key[None, :] > key[:, None]).to(tl.int32), axis=1)
        key = tl.sum(tl.where(rank[:, None] == slot[None, :], key[:, None], 0), axis=0)
    return key


@triton.jit
def _sorted_candidates(row_ptr, buf_ptr, fill, CAP: tl.constexpr, INTERP: tl.constexpr):
    """The candidate list as keys sorted descending; empty slots sort last."""
    slot = tl.arange(0, CAP)
    valid = slot < fill
    # Appends by other threads of this program must be visible before we read the list back.
    tl.debug_barrier()
    idx = tl.load(buf_ptr + slot, mask=valid, other=0)
    v = tl.load(row_ptr + idx, mask=valid, other=0.0).to(tl.float32)
    # Empty slots get distinct keys too (below every real key), so all keys are distinct.
    key = tl.where(valid, _order_key(v, idx), _KEY_EMPTY + slot.to(tl.int64))
    key = _sort_desc(key, CAP, INTERP)
    # Nobody may overwrite the list while another thread is still reading it.
    tl.debug_barrier()
    return key


@triton.jit
def _compact(row_ptr, buf_ptr, fill, C, CAP: tl.constexpr, INTERP: tl.constexpr):
    """Keep the top C of the candidate list (called only with fill > C) and return the new threshold:
    the C-th largest value. Later elements equal to it lose the tie on index, so `x > thr` is exact."""
    key = _sorted_candidates(row_ptr, buf_ptr, fill, CAP, INTERP)
    slot = tl.arange(0, CAP)
    tl.store(buf_ptr + slot, _key_index(key), mask=slot < C)
    thr = _key_value(tl.sum(tl.where(slot == C - 1, key, 0), axis=0))
    return tl.minimum(fill, C), thr


@triton.jit
def _absorb(x, start, fill, thr, row_ptr, buf_ptr, V, C,
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
def _finish_window(row_ptr, buf_ptr, fill, C, c_minus_1, K_MIN, K_MAX, idx_out_ptr, k_out_ptr,
                   CAP: tl.constexpr, KM: tl.constexpr, INTERP: tl.constexpr):
    """Sorted window -> Kneedle knee -> k; store k and the first KM window indices."""
    key = _sorted_candidates(row_ptr, buf_ptr, fill, CAP, INTERP)
    slot = tl.arange(0, CAP)
    w = _key_value(key)
    idx = _key_index(key)
    in_win = slot < C
    # Same float32 operations as recipe.losses.dbild.knee_k (IEEE division) so argmax ties agree.
    first = tl.sum(tl.where(slot == 0, w, 0.0), axis=0)
    last = tl.sum(tl.where(slot == C - 1, w, 0.0), axis=0)
    span = first - last
    safe_span = tl.where(span > 0, span, 1.0)
    y = tl.where(span > 0, tl.math.div_rn(w - last, tl.zeros_like(w) + safe_span), 0.0)
    xpos = tl.math.div_rn(slot.to(tl.float32), tl.zeros_like(w) + c_minus_1)
    score = (1.0 - xpos) - y
    score = tl.where(score != score, float("inf"), score)  # torch.argmax ranks NaN first
    score = tl.where(in_win, score, float("-inf"))
    knee = tl.argmax(score, axis=0, tie_break_left=True)
    k = tl.minimum(tl.maximum(knee + 1, K_MIN), K_MAX)
    tl.store(idx_out_ptr + slot, tl.where(in_win, idx, 0), mask=slot < KM)
    tl.store(k_out_ptr, k)


# --------------------------------------------------------------------------------------------- lane lists
@triton.jit
def _pair_bits(x_row, start, wl, V, live, MASKED: tl.constexpr, PACKED: tl.constexpr, KEY64: tl.constexpr):
    """Elements start + 2 wl ("lo") and start + 2 wl + 1 ("hi") of a row as integers: float32 bits, or
    16-bit bits sign-extended to int32. PACKED (16-bit rows at even, 4-byte aligned offsets) loads each
    pair as one int32 word: the halves then come apart with two shifts, and keeping words in flight
    costs 32-bit moves rather than a byte permute per logit. Unmasked loads take one scalar predicate,
    live, which keeps them vectorised."""
    if PACKED:
        w = tl.load(x_row.to(tl.pointer_type(tl.int32), bitcast=True) + start // 2 + wl, mask=live, other=0,
                    eviction_policy="evict_first")
        lo = (w << 16) >> 16
        hi = w >> 16
    else:
        offs = start + 2 * wl[:, None] + tl.arange(0, 2)[None, :]
        if MASKED:
            x = tl.load(x_row + offs, mask=offs < V, other=0.0, eviction_policy="evict_first")
        else:
            x = tl.load(x_row + offs, mask=live, other=0.0, eviction_policy="evict_first")
        if KEY64:
            bits = x.to(tl.int32, bitcast=True)
        else:
            bits = x.to(tl.int16, bitcast=True).to(tl.int32)
        lo, hi = tl.split(bits)
    return lo, hi


@triton.jit
def _lane_key(s, b, KEY64: tl.constexpr):
    """Integer key of a logit (bits s from `_pair_bits`) in block b, ordered like (value desc, block asc):
    the value bits in the high half, turned into a signed integer monotone in the value (negative values
    get their magnitude bits flipped), and 0xFFFF - b (float32: 2^31 - 1 - b in an int64) in the low half.
    Raw IEEE order, so -0.0 < +0.0 and a negative NaN sorts last: the kernel checks for the few rows
    where that differs from torch's order and leaves them to the exact kernel. The 16-bit form is one
    multiply-add (FMA pipe: s * 2^16 has a zero low half) and one xor with the sign-extended s."""
    b = b + tl.zeros((), dtype=tl.int32)  # a tensor even where the interpreter passes a Python int
    if KEY64:
        o = s ^ ((s >> 31) & 0x7FFFFFFF)
        key = (o.to(tl.int64) << 32) | (b ^ 0x7FFFFFFF).to(tl.int64)
    else:
        key = (s * 65536 + (0xFFFF - b)) ^ (s & 0x7FFF0000)
    return key


@triton.jit
def _insert(k1, k2, k3, k4, key, DEPTH: tl.constexpr):
    """Sorted insertion into a lane's k1 >= k2 >= k3 (>= k4 when DEPTH is 4); keys of one lane are
    distinct (different blocks). 2 * DEPTH - 1 integer min/max per logit: the loop's main cost."""
    if DEPTH == 4:
        k4 = tl.maximum(k4, tl.minimum(key, k3))
    k3 = tl.maximum(k3, tl.minimum(key, k2))
    k2 = tl.maximum(k2, tl.minimum(key, k1))
    k1 = tl.maximum(k1, key)
    return k1, k2, k3, k4


@triton.jit
def _absorb_pair(lists_lo, lists_hi, lo, hi, b, nan_sum, kmin, valid_lo, valid_hi,
                 DEPTH: tl.constexpr, KEY64: tl.constexpr, SUM_NAN: tl.constexpr, MASKED: tl.constexpr):
    """One block: both halves into their lane lists, and the NaN bookkeeping. bfloat16 (SUM_NAN) adds
    the values (s * 2^16 is the float32 of a bfloat16) in float32, which turns NaN for a NaN logit (or
    +inf with -inf, which only costs the exact kernel a row): FMA-pipe work instead of a running min."""
    a1, a2, a3, a4 = lists_lo
    c1, c2, c3, c4 = lists_hi
    key_lo = _lane_key(lo, b, KEY64)
    key_hi = _lane_key(hi, b, KEY64)
    if SUM_NAN:
        nan_sum += (lo * 65536).to(tl.float32, bitcast=True) + (hi * 65536).to(tl.float32, bitcast=True)
    else:
        if MASKED:
            kmin = tl.minimum(kmin, tl.minimum(tl.where(valid_lo, key_lo, kmin), tl.where(valid_hi, key_hi, kmin)))
        else:
            kmin = tl.minimum(kmin, tl.minimum(key_lo, key_hi))
    if MASKED:
        key_lo = tl.where(valid_lo, key_lo, _key_min(KEY64))
        key_hi = tl.where(valid_hi, key_hi, _key_min(KEY64))
    a1, a2, a3, a4 = _insert(a1, a2, a3, a4, key_lo, DEPTH)
    c1, c2, c3, c4 = _insert(c1, c2, c3, c4, key_hi, DEPTH)
    return (a1, a2, a3, a4), (c1, c2, c3, c4), nan_sum, kmin


@triton.jit
def _key_min(KEY64: tl.constexpr):
    if KEY64:
        v = tl.full((), _KEY_EMPTY, tl.int64)
    else:
        v = tl.full((), _KEY32_MIN, tl.int32)
    return v


@triton.jit
def _key_value_bits(key, KEY64: tl.constexpr):
    """The (ordered, signed) value half of a lane key."""
    if KEY64:
        v = (key >> 32).to(tl.int32)
    else:
        v = key >> 16
    return v


@triton.jit
def _count_at_least(k1, k2, k3, k4, t, DEPTH: tl.constexpr):
    """How many lane keys are >= t. (Summed in float32, exact here: integer adds are overflow-checked,
    hence slow, in the CPU interpreter.)"""
    n = (k1 >= t).to(tl.float32) + (k2 >= t).to(tl.float32) + (k3 >= t).to(tl.float32)
    if DEPTH == 4:
        n += (k4 >= t).to(tl.float32)
    return tl.sum(n, axis=0)


@triton.jit
def _value_threshold(k1, k2, k3, k4, C, LANES: tl.constexpr, G: tl.constexpr, DEPTH: tl.constexpr,
                     KEY64: tl.constexpr):
    """The C-th largest kept value, as the smallest key carrying it (block half zero): the largest t of
    that form with #{lane keys >= t} >= C, built bit by bit (two's complement: setting a lower bit always
    increases t). There are always >= C real keys. `key >= t` then means "value >= that value", all the
    exactness argument needs.

    The search starts below the bits that the row maximum M and a lower bound L of t share (every value
    in [L, M], t included, has them): L is the least of the maxima of G >= C groups of lanes, as G
    distinct elements are >= it. For real rows the two share sign and exponent: ~7 steps instead of 15."""
    if KEY64:
        zero = tl.zeros((), dtype=tl.int64)
        one = tl.full((), 1, tl.int64)
        value_mask = tl.full((), -(2**32), tl.int64)
        nbits = 64
    else:
        zero = tl.zeros((), dtype=tl.int32)
        one = tl.full((), 1, tl.int32)
        value_mask = tl.full((), -(2**16), tl.int32)
        nbits = 32
    hi = tl.max(k1, axis=0) & value_mask
    lo = tl.min(tl.max(tl.reshape(k1, (G, LANES // G), can_reorder=True), axis=1), axis=0) & value_mask
    diff = hi ^ lo
    if diff < 0:  # different signs: search every bit, the sign first
        t = tl.where(_count_at_least(k1, k2, k3, k4, zero, DEPTH) >= C, zero, _key_min(KEY64))
        first = tl.full((), nbits - 2, tl.int32)
    else:
        # Highest differing bit, from the float32 exponent of diff (rounding up only starts one bit higher);
        # hi == lo: no value bit left to search (bit nbits/2 - 1 is the block half's).
        top = ((diff.to(tl.float32).to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
        first = tl.minimum(tl.where(diff == 0, nbits // 2 - 2, top), nbits - 2)
        t = hi & ~((one << (first + 1)) - 1)
    for i in range(nbits - 2 - first, nbits // 2):
        cand = t | (one << (nbits - 2 - i))
        t = tl.where(_count_at_least(k1, k2, k3, k4, cand, DEPTH) >= C, cand, t)
    return t


@triton.jit
def _append_lane_keys(t, key, lane, fill, buf_ptr, LANES: tl.constexpr, KEY64: tl.constexpr):
    """Append the vocabulary index of every lane key >= t to the candidate list."""
    q = key >= t
    if KEY64:
        blk = key.to(tl.int32) ^ 0x7FFFFFFF
    else:
        blk = 0xFFFF - (key & 0xFFFF)
    pos = fill + tl.cumsum(q.to(tl.int32), axis=0) - 1
    tl.store(buf_ptr + pos, blk * LANES + lane, mask=q)
    return fill + tl.sum(q.to(tl.int32), axis=0)


@triton.jit
def _key_float(t, x_row, KEY64: tl.constexpr):
    """The float32 value of a threshold key's value half (the inverse of the ordering transform; an
    int64 lane key's high word is ordered like `_order_key`'s)."""
    if KEY64:
        v = _key_value(t)
    else:
        o = _key_value_bits(t, KEY64)
        bits = (o ^ ((o >> 31) & 0x7FFF)).to(tl.int16)
        v = bits.to(x_row.dtype.element_ty, bitcast=True).to(tl.float32)
    return v


@triton.jit
def _below(t):
    """The largest float32 below t, where the exact kernel starts its strict threshold (x > it means
    x >= t). NaN (no start: every element qualifies) when t is -inf (elements equal to it must pass),
    zero (the float below is a denormal, which a flushing compare would take for -0.0) or NaN."""
    bits = t.to(tl.int32, bitcast=True)
    bits = tl.where(t > 0, bits - 1, bits + 1)
    return tl.where((t == float("-inf")) | (t == 0) | (t != t), float("nan"), bits.to(tl.float32, bitcast=True))


@triton.jit
def _program_input(x0_ptr, x1_ptr, stride0, stride1, first_slot):
    """Grid (rows, inputs): axis 1 picks the leading input (ref, then trainee). Returns its row and
    the window's index row * 2 + slot into the (rows, 2, ...) outputs."""
    row = tl.program_id(0).to(tl.int64)
    which = tl.program_id(1)
    if which == 0:
        x_row = x0_ptr + row * stride0
    else:
        x_row = x1_ptr + row * stride1
    return x_row, row * 2 + first_slot + which


# --------------------------------------------------------------------------------------------- kernels
@triton.jit
def _dbild_window_kernel(x0_ptr, x1_ptr, stride0, stride1, first_slot, V, C, c_minus_1, K_MIN, K_MAX,
                         scratch_ptr, idx_out_ptr, k_out_ptr, ok_ptr, thr_ptr,
                         CAP: tl.constexpr, LANES: tl.constexpr, DEPTH: tl.constexpr, G: tl.constexpr,
                         KM: tl.constexpr, KEY64: tl.constexpr, PACKED: tl.constexpr, SUM_NAN: tl.constexpr,
                         INF_BITS: tl.constexpr, INTERP: tl.constexpr):
    """Window, knee and k of one leading input per program (grid: rows x inputs).

    One pass, branch-free: the row is read as blocks of LANES logits and lane j keeps the DEPTH largest
    keys of its column (elements j, j + LANES, ...) with a min/max insertion network. Let t be the
    C-th largest kept value. Unless some lane kept DEPTH keys >= t (it may have dropped one more), every
    element of the row with value >= t is kept, so those candidates hold the exact top C (ties
    included), which `_finish_window` sorts. Otherwise, or when ties leave more than CAP candidates,
    ok = 0 and `_dbild_window_exact_kernel` redoes the row. For i.i.d. logits and C = 64, DEPTH 3 of
    2048 lanes leaves ~0.5% of rows to it, DEPTH 4 of 1024 lanes well under 0.1%."""
    x_row, win = _program_input(x0_ptr, x1_ptr, stride0, stride1, first_slot)
    WL: tl.constexpr = LANES // 2
    wl = tl.arange(0, WL)
    empty = tl.zeros((WL,), dtype=tl.int64 if KEY64 else tl.int32) + _key_min(KEY64)
    lists_lo = (empty, empty, empty, empty)
    lists_hi = (empty, empty, empty, empty)
    nan_sum = tl.zeros((WL,), dtype=tl.float32)
    kmin = ~empty  # the largest key; a running minimum to spot negative NaNs (torch ranks them first)
    n_full = V // LANES
    # Full blocks, three in flight: each iteration consumes one and issues the load of the third next.
    nxt1 = _pair_bits(x_row, 0, wl, V, n_full > 0, False, PACKED, KEY64)
    nxt2 = _pair_bits(x_row, LANES, wl, V, n_full > 1, False, PACKED, KEY64)
    nxt3 = _pair_bits(x_row, 2 * LANES, wl, V, n_full > 2, False, PACKED, KEY64)
    for b in range(0, n_full):
        lo, hi = nxt1
        nxt1 = nxt2
        nxt2 = nxt3
        nxt3 = _pair_bits(x_row, (b + 3) * LANES, wl, V, b + 3 < n_full, False, PACKED, KEY64)
        lists_lo, lists_hi, nan_sum, kmin = _absorb_pair(lists_lo, lists_hi, lo, hi, b, nan_sum, kmin, True, True,
                                                         DEPTH, KEY64, SUM_NAN, False)
    start = n_full * LANES
    lo, hi = _pair_bits(x_row, start, wl, V, True, True, False, KEY64)
    lists_lo, lists_hi, nan_sum, kmin = _absorb_pair(lists_lo, lists_hi, lo, hi, n_full, nan_sum, kmin,
                                                     start + 2 * wl < V, start + 2 * wl + 1 < V,
                                                     DEPTH, KEY64, SUM_NAN, True)
    a1, a2, a3, a4 = lists_lo
    c1, c2, c3, c4 = lists_hi
    k1 = tl.interleave(a1, c1)  # lane 2 wl + 0 / + 1: lane j of the block again
    k2 = tl.interleave(a2, c2)
    k3 = tl.interleave(a3, c3)
    k4 = tl.interleave(a4, c4)
    if DEPTH == 4:
        klast = k4
    else:
        klast = k3
    t = _value_threshold(k1, k2, k3, k4, C, LANES, G, DEPTH, KEY64)
    n_cand = _count_at_least(k1, k2, k3, k4, t, DEPTH).to(tl.int32)
    # Exact unless: a lane may have dropped a key >= t; ties beyond CAP; t is +0.0 (a -0.0 ties with
    # it for torch but sorts below it here); the row holds a NaN (torch ranks every NaN first, equal).
    exact = (tl.sum((klast >= t).to(tl.int32), axis=0) == 0) & (n_cand <= CAP) & (_key_value_bits(t, KEY64) != 0)
    if SUM_NAN:
        total = tl.sum(nan_sum, axis=0)
        exact = exact & (total == total)
    else:
        exact = exact & (tl.max(_key_value_bits(k1, KEY64), axis=0) <= INF_BITS)
        exact = exact & (tl.min(_key_value_bits(kmin, KEY64), axis=0) >= -INF_BITS - 1)
    tl.store(ok_ptr + win, exact.to(tl.int32))
    tl.store(thr_ptr + win, _below(_key_float(t, x_row, KEY64)))
    if exact:
        lane = tl.arange(0, LANES)
        buf = scratch_ptr + win * CAP
        fill = tl.zeros((), dtype=tl.int32)
        fill = _append_lane_keys(t, k1, lane, fill, buf, LANES, KEY64)
        fill = _append_lane_keys(t, k2, lane, fill, buf, LANES, KEY64)
        if DEPTH == 4:
            fill = _append_lane_keys(t, k3, lane, fill, buf, LANES, KEY64)
        _finish_window(x_row, buf, fill, C, c_minus_1, K_MIN, K_MAX, idx_out_ptr + win * KM, k_out_ptr + win,
                       CAP, KM, INTERP)


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
            fill, thr = _absorb(x, start, fill, thr, x_row, buf, V, C, CAP, SUB, BLOCK, False, INTERP)
        start = n_full * BLOCK
        if start < V:
            offs = start + lane
            x = tl.load(x_row + offs, mask=offs < V, other=0.0).to(tl.float32)
            fill, thr = _absorb(x, start, fill, thr, x_row, buf, V, C, CAP, SUB, BLOCK, True, INTERP)
        _finish_window(x_row, buf, fill, C, c_minus_1, K_MIN, K_MAX, idx_out_ptr + win * KM, k_out_ptr + win,
                       CAP, KM, INTERP)


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
    row = tl.program_id(0).to(tl.int64)
    r_row = ref_ptr + row * stride_r
    t_row = trn_ptr + row * stride_t
    # A real loop (not static_range): one branch's tiles live at a time, halving registers.
    for br in range(0, 2):
        slot = row * 2 + br
        k = tl.load(k_ptr + slot)
        # The knee usually leaves k far below k_max: use the smallest of 16 / 32 / KM that holds k
        # (the work is quadratic in the tile). Entries of g past the tile are never read (masked by k).
        if KM <= 16:
            _pair_branch(r_row, t_row, idx_ptr + slot * KM, k, loss_ptr + slot, g_ptr + slot * KM, inv_tau,
                         KM, NEED_GRAD)
        else:
            if k <= 16:
                _pair_branch(r_row, t_row, idx_ptr + slot * KM, k, loss_ptr + slot, g_ptr + slot * KM, inv_tau,
                             16, NEED_GRAD)
            else:
                if KM <= 32:
                    _pair_branch(r_row, t_row, idx_ptr + slot * KM, k, loss_ptr + slot, g_ptr + slot * KM,
                                 inv_tau, KM, NEED_GRAD)
                else:
                    if k <= 32:
                        _pair_branch(r_row, t_row, idx_ptr + slot * KM, k, loss_ptr + slot, g_ptr + slot * KM,
                                     inv_tau, 32, NEED_GRAD)
                    else:
                        _pair_branch(r_row, t_row, idx_ptr + slot * KM, k, loss_ptr + slot, g_ptr + slot * KM,
                                     inv_tau, KM, NEED_GRAD)


@triton.jit
def _dbild_scatter_kernel(grad_ptr, stride_g, idx_ptr, k_ptr, g_ptr, grad_out_ptr, inv_rows,
                          KM: tl.constexpr):
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


# --------------------------------------------------------------------------------------------- launch
def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _exact_config(vocab: int, candidates: int, block_v: int | None, cap: int | None):
    """(CAP, SUB, BLOCK) of the exact kernel; CAP also sizes the lane kernel's candidate list."""
    cap = max(4 * _next_pow2(max(2, candidates)), 64) if cap is None else cap
    sub = cap // 2
    # SUB <= CAP - C guarantees a sub-block always fits after one compaction.
    assert cap & (cap - 1) == 0 and 1 <= sub <= cap - candidates, (cap, candidates)
    block = min(2048, max(_next_pow2(vocab), sub)) if block_v is None else block_v
    assert block & (block - 1) == 0 and block >= sub, (block, sub)
    return cap, sub, block


def _lane_config(vocab: int, candidates: int, itemsize: int, lanes: int | None, depth: int | None):
    """(LANES, DEPTH, G) of the lane kernel, G the number of lane groups of the threshold's lower bound.

    16-bit inputs, C <= 64: 3 keys in each of 2048 lanes (5 min/max per logit; ~0.5-1% of rows go to
    the exact kernel). Wider windows: 4 keys of 1024 lanes, which a window of 128 crowds less. float32
    keys are int64: 4 of 512 lanes. Never fewer lanes than C (the lower bound needs G >= C groups)."""
    groups = max(2, _next_pow2(candidates))
    if itemsize <= 2:
        depth = depth or LANE_TUNING["depth"]
        lanes = lanes or LANE_TUNING["lanes"]
    if depth is None:
        depth = 3 if itemsize <= 2 and groups <= 64 and (lanes is None or lanes >= 2048) else 4
    if lanes is None:
        lanes = (2048 if depth == 3 else 1024) if itemsize <= 2 else 512
    lanes = max(min(lanes, _next_pow2(vocab)), groups, 16)
    assert lanes & (lanes - 1) == 0 and (itemsize > 2 or vocab // lanes < 0xFFFF), (lanes, vocab)
    assert depth in (3, 4), depth
    return lanes, depth, groups


# Launch shapes, chosen from ptxas reports for sm_90 (python -m recipe.kernels.compile_check) and SASS
# of the block loop (tests/perf/README.md). The lane kernel's block loop is integer min/max bound (the
# ALU pipe, half rate): see _lane_config for depth and lanes. Exact kernel (fallback rows only):
# capped at 96 (ptxas otherwise takes 128 for values hoisted out of the compaction's sort). Pair
# kernel: the KM x KM tiles need 8 warps (KM=64) or 32 warps (KM=128).
# LANE_TUNING: the lane kernel's launch and depth / lanes overrides (None: the rule in _lane_config)
# for 16-bit inputs; tests/perf/bench_dbild.py --sweep sets it to compare shapes on a GPU. float32
# rows (int64 keys, 512 lanes) keep 4 warps: at 8 the compiler's layout repeats their pair loads.
LANE_TUNING = {"num_warps": 8, "maxnreg": 64, "depth": None, "lanes": None}
_LANE_LAUNCH_FP32 = {"num_warps": 4, "maxnreg": 80}
_WINDOW_WARPS, _WINDOW_MAXNREG = 4, 96
_INF_BITS = {torch.bfloat16: 0x7F80, torch.float16: 0x7C00, torch.float32: 0x7F800000}


def _lane_launch(itemsize: int) -> dict:
    if itemsize > 2:
        return dict(_LANE_LAUNCH_FP32)
    return {"num_warps": LANE_TUNING["num_warps"], "maxnreg": LANE_TUNING["maxnreg"]}


def _pairs_launch(km: int) -> dict:
    if km <= 32:
        return {"num_warps": 4}
    if km <= 64:
        return {"num_warps": 8, "maxnreg": 128}
    return {"num_warps": 32}


def _scatter_warps(km: int) -> int:
    return 4 if km <= 64 else 8


def _launch_opts(opts: dict, device: torch.device) -> dict:
    # maxnreg is an NVIDIA (ptxas) option: drop it for the interpreter and for ROCm.
    if device.type != "cuda" or _interpreting() or torch.version.hip is not None:
        opts = {k: v for k, v in opts.items() if k != "maxnreg"}
    return opts


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _packed_rows(*leads: torch.Tensor) -> bool:
    """16-bit rows starting at 4-byte boundaries: the lane kernel can read them as int32 pairs."""
    return all(t.element_size() == 2 and t.stride(0) % 2 == 0 and t.data_ptr() % 4 == 0 for t in leads)


def _dbild_forward(ref, trainee, candidates, k_min, k_max, temperature, need_grad,
                   lanes=None, depth=None, block_v=None, cap=None, interp_path=None, exact_only=False):
    """Run the window and pair kernels. Returns per-row losses (rows, 2) f32, k (rows, 2) int32,
    leading indices (rows, 2, KM) int32, if need_grad d loss_row / d gathered trainee logits
    (rows, 2, KM) f32 (else None), and per window whether the lane kernel settled it (rows, 2) int32.
    Column 0 is the ref-led (teacher-led) branch, column 1 the trainee-led one.
    lanes / depth / block_v / cap / interp_path / exact_only: tiling and path overrides for tests."""
    rows, vocab = ref.shape
    candidates = min(candidates, vocab)
    k_max = candidates if k_max is None else min(k_max, candidates)
    km = max(2, _next_pow2(k_max))
    dev = ref.device
    cap, sub, block = _exact_config(vocab, candidates, block_v, cap)
    scratch = torch.empty((rows, 2, cap), dtype=torch.int32, device=dev)
    ok = torch.zeros((rows, 2), dtype=torch.int32, device=dev)
    # Per window, a lower bound of its C-th value from the lane kernel: where the fallback starts its threshold.
    thr = torch.full((rows, 2), float("nan"), dtype=torch.float32, device=dev)
    idx = torch.empty((rows, 2, km), dtype=torch.int32, device=dev)
    k = torch.empty((rows, 2), dtype=torch.int32, device=dev)
    losses = torch.empty((rows, 2), dtype=torch.float32, device=dev)
    g = torch.empty((rows, 2, km) if need_grad else (1,), dtype=torch.float32, device=dev)
    interp = _interpreting() if interp_path is None else bool(interp_path)
    exact_opts = _launch_opts({"num_warps": _WINDOW_WARPS, "maxnreg": _WINDOW_MAXNREG}, dev)
    # One launch of each window kernel over (rows, both inputs) when the two share a dtype; else one per input.
    if ref.dtype == trainee.dtype:
        launches = [((ref, trainee), 0)]
    else:
        launches = [((ref, ref), 0), ((trainee, trainee), 1)]
    for (x0, x1), first_slot in launches:
        grid = (rows, 2 if x0 is not x1 else 1)
        args = (x0, x1, x0.stride(0), x1.stride(0), first_slot, vocab, candidates, float(candidates - 1), k_min,
                k_max, scratch, idx, k, ok, thr)
        if not exact_only:
            lanes_, depth_, groups = _lane_config(vocab, candidates, x0.element_size(), lanes, depth)
            lane_opts = _launch_opts(_lane_launch(x0.element_size()), dev)
            _dbild_window_kernel[grid](*args, CAP=cap, LANES=lanes_, DEPTH=depth_, G=groups, KM=km,
                                       KEY64=x0.element_size() > 2, PACKED=_packed_rows(x0, x1),
                                       SUM_NAN=x0.dtype == torch.bfloat16, INF_BITS=_INF_BITS[x0.dtype],
                                       INTERP=interp, **lane_opts)
        _dbild_window_exact_kernel[grid](*args, CAP=cap, SUB=sub, BLOCK=block, KM=km, INTERP=interp, **exact_opts)
    _dbild_pairs_kernel[(rows,)](ref, trainee, ref.stride(0), trainee.stride(0), idx, k, losses, g,
                                 1.0 / float(temperature), KM=km, NEED_GRAD=need_grad,
                                 **_launch_opts(_pairs_launch(km), dev))
    return losses, k, idx, (g if need_grad else None), ok


def _use_reference(ref: torch.Tensor, trainee: torch.Tensor, candidates: int) -> bool:
    if ref.dtype not in _INF_BITS or trainee.dtype not in _INF_BITS:
        return True  # float64 is for checking; the kernels compute in float32 from bf16/fp16/fp32
    if min(candidates, ref.shape[-1]) > MAX_TRITON_CANDIDATES:
        warnings.warn(f"dbild_loss_triton: candidates > {MAX_TRITON_CANDIDATES} runs the torch reference",
                      stacklevel=3)
        return True
    return False


def _prepare(ref, trainee):
    if not (ref.device == trainee.device):
        raise ValueError(f"ref and trainee must be on one device, got {ref.device} and {trainee.device}")
    return ref.detach().contiguous(), trainee.contiguous()


class DBiLDTritonFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ref, trainee, candidates, k_min, k_max, temperature):
        need_grad = bool(ctx.needs_input_grad[1])
        with torch.cuda.device(trainee.device) if trainee.is_cuda else contextlib.nullcontext():
            losses, k, idx, g, _ = _dbild_forward(ref, trainee, candidates, k_min, k_max, temperature, need_grad)
        ctx.save_for_backward(idx, k, g if need_grad else losses.new_empty(0))
        ctx.shape, ctx.grad_dtype = trainee.shape, trainee.dtype
        return losses.sum() / ref.shape[0]

    @staticmethod
    def backward(ctx, grad_out):
        idx, k, g = ctx.saved_tensors
        rows, vocab = ctx.shape
        # The only (rows x V) buffer: the gradient itself, in the trainee's dtype.
        grad = torch.zeros((rows, vocab), dtype=ctx.grad_dtype, device=idx.device)
        grad_out = grad_out.detach().to(torch.float32).contiguous()
        km = idx.shape[-1]
        with torch.cuda.device(grad.device) if grad.is_cuda else contextlib.nullcontext():
            _dbild_scatter_kernel[(rows,)](grad, grad.stride(0), idx, k, g, grad_out, 1.0 / rows, KM=km,
                                           num_warps=_scatter_warps(km))
        return None, grad, None, None, None, None


def dbild_loss_triton(ref, trainee, *, candidates=64, k_min=2, k_max=None, temperature=3.0) -> torch.Tensor:
    """DBiLD(ref, trainee) with the fused kernels; same contract as `dbild_loss_torch`."""
    check_logits(ref, trainee, candidates, k_min, k_max)
    if ref.shape[0] == 0:
        return trainee.sum() * 0.0
    if _use_reference(ref, trainee, candidates):
        return dbild_loss_torch(ref, trainee, candidates=candidates, k_min=k_min, k_max=k_max,
                                temperature=temperature)
    ref, trainee = _prepare(ref, trainee)
    return DBiLDTritonFunction.apply(ref, trainee, int(candidates), int(k_min),
                                     None if k_max is None else int(k_max), float(temperature))


def dbild_branches_triton(ref, trainee, *, candidates=64, k_min=2, k_max=None, temperature=3.0,
                          lanes=None, depth=None, block_v=None, cap=None, interp_path=None, exact_only=False,
                          return_fast_rows=False) -> dict[str, torch.Tensor]:
    """Per-row branch losses and k, like `dbild_branches_torch` (for tests and diagnostics; no grad).

    Overrides for tests: lanes and depth (lane-list kernel: lanes, a power of two, keeping depth 3 or 4
    keys each), block_v and cap (exact kernel's block and candidate-list sizes, powers of two);
    exact_only skips the lane-list kernel; interp_path forces (True) or disables (False) the
    interpreter-friendly formulation (default: on iff TRITON_INTERPRET=1), so the compiled formulation
    can be run under the interpreter too. return_fast_rows adds "fast_rows":
    per row, whether the trainee-led window was settled by the lane-list kernel."""
    check_logits(ref, trainee, candidates, k_min, k_max)
    if _use_reference(ref, trainee, candidates):
        return dbild_branches_torch(ref, trainee, candidates=candidates, k_min=k_min, k_max=k_max,
                                    temperature=temperature)
    ref, trainee = _prepare(ref, trainee)
    if ref.shape[0] == 0:
        empty_k = torch.zeros(0, dtype=torch.long, device=ref.device)
        empty_l = torch.zeros(0, dtype=torch.float32, device=ref.device)
        return {"ref_led_k": empty_k, "ref_led_loss": empty_l, "trainee_led_k": empty_k,
                "trainee_led_loss": empty_l}
    with torch.no_grad():
        losses, k, _, _, ok = _dbild_forward(ref, trainee, candidates, k_min, k_max, temperature, False,
                                             lanes=lanes, depth=depth, block_v=block_v, cap=cap,
                                             interp_path=interp_path, exact_only=exact_only)
    k = k.long()
    out = {"ref_led_k": k[:, 0], "ref_led_loss": losses[:, 0],
           "trainee_led_k": k[:, 1], "trainee_led_loss": losses[:, 1]}
    if return_fast_rows:
        out["fast_rows"] = ok[:, 1].bool()
    return out
