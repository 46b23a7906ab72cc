"""The one-pass window kernel, `_dbild_window_kernel`, and its lane keys.

It settles almost every window in one branch-free read of the row, and marks the others (a crowded
lane, more than CAP tied candidates, +0.0 at the threshold, a NaN in the row) for the exact kernel
(recipe/kernels/window_exact.py), with a lower bound of their C-th value to start from.

Lane keys: one integer per logit ordered like (value desc, block asc), an int32 for 16-bit rows and an
int64 for float32 rows (`_lane_key`). They select candidates; the int64 candidate keys of window.py
(value desc, index asc) then sort the final window.
"""
from __future__ import annotations

import triton
import triton.language as tl

from recipe.kernels.window import _candidate_key_value, _finish_window, _program_input

# Globals read by kernels must be constexprs that compare equal to themselves (see window.py).
_KEY64_MIN = tl.constexpr(-(2**63))
_KEY32_MIN = tl.constexpr(-(2**31))


@triton.jit
def _load_block_bits(x_row, start, wl, V, live, MASKED: tl.constexpr, PACKED: tl.constexpr, KEY64: tl.constexpr):
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
    """The lane key of a logit (bits s from `_load_block_bits`) in block b, ordered like (value desc,
    block asc): the value bits in the high half, turned into a signed integer monotone in the value
    (negative values get their magnitude bits flipped), and 0xFFFF - b (float32: 2^31 - 1 - b in an
    int64) in the low half.
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
def _insert_lane_key(k1, k2, k3, k4, key, DEPTH: tl.constexpr):
    """Sorted insertion into a lane's k1 >= k2 >= k3 (>= k4 when DEPTH is 4); keys of one lane are
    distinct (different blocks). 2 * DEPTH - 1 integer min/max per logit: the loop's main cost."""
    if DEPTH == 4:
        k4 = tl.maximum(k4, tl.minimum(key, k3))
    k3 = tl.maximum(k3, tl.minimum(key, k2))
    k2 = tl.maximum(k2, tl.minimum(key, k1))
    k1 = tl.maximum(k1, key)
    return k1, k2, k3, k4


@triton.jit
def _insert_block(lists_lo, lists_hi, lo, hi, b, nan_sum, kmin, valid_lo, valid_hi,
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
        key_lo = tl.where(valid_lo, key_lo, _lane_key_min(KEY64))
        key_hi = tl.where(valid_hi, key_hi, _lane_key_min(KEY64))
    a1, a2, a3, a4 = _insert_lane_key(a1, a2, a3, a4, key_lo, DEPTH)
    c1, c2, c3, c4 = _insert_lane_key(c1, c2, c3, c4, key_hi, DEPTH)
    return (a1, a2, a3, a4), (c1, c2, c3, c4), nan_sum, kmin


@triton.jit
def _lane_key_min(KEY64: tl.constexpr):
    if KEY64:
        v = tl.full((), _KEY64_MIN, tl.int64)
    else:
        v = tl.full((), _KEY32_MIN, tl.int32)
    return v


@triton.jit
def _lane_key_value_bits(key, KEY64: tl.constexpr):
    """The (ordered, signed) value half of a lane key."""
    if KEY64:
        v = (key >> 32).to(tl.int32)
    else:
        v = key >> 16
    return v


@triton.jit
def _count_lane_keys_at_least(k1, k2, k3, k4, t, DEPTH: tl.constexpr):
    """How many lane keys are >= t. (Summed in float32, exact here: integer adds are overflow-checked,
    hence slow, in the CPU interpreter.)"""
    n = (k1 >= t).to(tl.float32) + (k2 >= t).to(tl.float32) + (k3 >= t).to(tl.float32)
    if DEPTH == 4:
        n += (k4 >= t).to(tl.float32)
    return tl.sum(n, axis=0)


@triton.jit
def _lane_threshold(k1, k2, k3, k4, C, LANES: tl.constexpr, G: tl.constexpr, DEPTH: tl.constexpr,
                    KEY64: tl.constexpr):
    """The C-th largest kept value, as the smallest key carrying it (block half zero): the largest t of
    that form with #{lane keys >= t} >= C, built bit by bit (two's complement: setting a lower bit always
    increases t). There are always >= C real keys. `key >= t` then means "value >= that value", all the
    exactness argument needs.

    The search starts below the bits that the row maximum M and a lower bound L of t share (every value
    in [L, M], t included, has them): L is the least of the maxima of G >= C groups of lanes, as G
    distinct elements are >= it. For real rows the two share sign and exponent, which leaves a bf16 row
    its 7 mantissa bits to search instead of 15 bits."""
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
        t = tl.where(_count_lane_keys_at_least(k1, k2, k3, k4, zero, DEPTH) >= C, zero, _lane_key_min(KEY64))
        first = tl.full((), nbits - 2, tl.int32)
    else:
        # Highest differing bit, from the float32 exponent of diff (rounding up only starts one bit higher);
        # hi == lo: no value bit left to search (bit nbits/2 - 1 is the block half's).
        top = ((diff.to(tl.float32).to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
        first = tl.minimum(tl.where(diff == 0, nbits // 2 - 2, top), nbits - 2)
        t = hi & ~((one << (first + 1)) - 1)
    for i in range(nbits - 2 - first, nbits // 2):
        cand = t | (one << (nbits - 2 - i))
        t = tl.where(_count_lane_keys_at_least(k1, k2, k3, k4, cand, DEPTH) >= C, cand, t)
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
def _lane_key_float(t, x_row, KEY64: tl.constexpr):
    """The float32 value of a threshold key's value half (the inverse of the ordering transform; an
    int64 lane key's high word is ordered like `_candidate_key`'s)."""
    if KEY64:
        v = _candidate_key_value(t)
    else:
        o = _lane_key_value_bits(t, KEY64)
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
    ok = 0 and `_dbild_window_exact_kernel` redoes the row. DEPTH and LANES trade the loop's cost
    (2 * DEPTH - 1 integer min/max per logit) against the share of rows redone (DBiLDTuning;
    tests/perf/README.md has the shares measured for both depths).

    16-bit rows that start at 4-byte boundaries (PACKED) are read as int32 pairs, three blocks in flight."""
    x_row, win = _program_input(x0_ptr, x1_ptr, stride0, stride1, first_slot)
    WL: tl.constexpr = LANES // 2
    wl = tl.arange(0, WL)
    empty = tl.zeros((WL,), dtype=tl.int64 if KEY64 else tl.int32) + _lane_key_min(KEY64)
    lists_lo = (empty, empty, empty, empty)
    lists_hi = (empty, empty, empty, empty)
    nan_sum = tl.zeros((WL,), dtype=tl.float32)
    kmin = ~empty  # the largest key; a running minimum to spot negative NaNs (torch ranks them first)
    n_full = V // LANES
    # Full blocks, three in flight: each iteration consumes one and issues the load of the third next.
    nxt1 = _load_block_bits(x_row, 0, wl, V, n_full > 0, False, PACKED, KEY64)
    nxt2 = _load_block_bits(x_row, LANES, wl, V, n_full > 1, False, PACKED, KEY64)
    nxt3 = _load_block_bits(x_row, 2 * LANES, wl, V, n_full > 2, False, PACKED, KEY64)
    for b in range(0, n_full):
        lo, hi = nxt1
        nxt1 = nxt2
        nxt2 = nxt3
        nxt3 = _load_block_bits(x_row, (b + 3) * LANES, wl, V, b + 3 < n_full, False, PACKED, KEY64)
        lists_lo, lists_hi, nan_sum, kmin = _insert_block(lists_lo, lists_hi, lo, hi, b, nan_sum, kmin, True, True,
                                                          DEPTH, KEY64, SUM_NAN, False)
    start = n_full * LANES
    lo, hi = _load_block_bits(x_row, start, wl, V, True, True, False, KEY64)
    lists_lo, lists_hi, nan_sum, kmin = _insert_block(lists_lo, lists_hi, lo, hi, n_full, nan_sum, kmin,
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
    t = _lane_threshold(k1, k2, k3, k4, C, LANES, G, DEPTH, KEY64)
    n_cand = _count_lane_keys_at_least(k1, k2, k3, k4, t, DEPTH).to(tl.int32)
    # Exact unless: a lane may have dropped a key >= t; ties beyond CAP; t is +0.0 (a -0.0 ties with
    # it for torch but sorts below it here); the row holds a NaN (torch ranks every NaN first, equal).
    exact = (tl.sum((klast >= t).to(tl.int32), axis=0) == 0) & (n_cand <= CAP) & (_lane_key_value_bits(t, KEY64) != 0)
    if SUM_NAN:
        total = tl.sum(nan_sum, axis=0)
        exact = exact & (total == total)
    else:
        exact = exact & (tl.max(_lane_key_value_bits(k1, KEY64), axis=0) <= INF_BITS)
        exact = exact & (tl.min(_lane_key_value_bits(kmin, KEY64), axis=0) >= -INF_BITS - 1)
    tl.store(ok_ptr + win, exact.to(tl.int32))
    tl.store(thr_ptr + win, _below(_lane_key_float(t, x_row, KEY64)))
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


