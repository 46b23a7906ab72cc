"""The candidate window of DBiLD (docs/method.md, DBiLD steps 1-2), the part both window kernels share:
from a list of candidate indices that holds the exact top C of a row, the window sorted (value desc,
index asc), its Kneedle knee, k, and the first k_max window indices.

Two kernels fill that list. `window_lanes._dbild_window_kernel` does it in one branch-free pass for
almost every row; `window_exact._dbild_window_exact_kernel` rereads the few rows it could not settle.
Both end in `_finish_window`.

Candidates are sorted as int64 candidate keys: one int64 per candidate whose descending order is
(value desc, index asc), so every key is distinct and ties never need a second pass. The knee is the
reference's float32 formula with IEEE divisions, so argmax ties agree with it.

INTERP (a constexpr) selects, in two places (`_sort_candidate_keys` here, `window_exact._block_max`),
an equivalent formulation that the CPU interpreter runs fast: there, reductions and scans with a custom
combine function run element by element in Python. tests/test_kernels.py also runs the GPU formulation
under the interpreter (`DBiLDTuning(interpreter_formulation=False)`).
"""
from __future__ import annotations

import triton
import triton.language as tl

# Globals read by kernels must be constexprs that compare equal to themselves (Triton re-checks them
# at every launch), so no NaN here: NaN is spelled float("nan") inside the kernels.
_KEY_EMPTY = tl.constexpr(-(2**63))
_LOW31 = tl.constexpr(0x7FFFFFFF)


@triton.jit
def _candidate_key(v, idx):
    """The int64 candidate key of value v at vocabulary index idx: descending keys are (value desc,
    index asc)."""
    v = tl.where(v == 0.0, 0.0, v)  # -0.0 == +0.0 for torch; let the index decide
    v = tl.where(v != v, float("nan"), v)  # a single (positive) NaN pattern, ranked above +inf like topk
    bits = v.to(tl.int32, bitcast=True)
    ordered = tl.where(bits >= 0, bits, bits ^ _LOW31)  # monotone in the float value
    return (ordered.to(tl.int64) << 32) | (idx ^ _LOW31).to(tl.int64)  # low word: 2^31-1-idx


@triton.jit
def _candidate_key_value(key):
    """The float32 value of a candidate key (its high word)."""
    ordered = (key >> 32).to(tl.int32)
    bits = tl.where(ordered >= 0, ordered, ordered ^ _LOW31)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _candidate_key_index(key):
    """The vocabulary index of a candidate key (its low word)."""
    return key.to(tl.int32) ^ _LOW31  # the truncation keeps the low word


@triton.jit
def _sort_candidate_keys(key, CAP: tl.constexpr, INTERP: tl.constexpr):
    """Distinct keys, descending."""
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
    """The candidate list (fill indices at buf_ptr) as candidate keys sorted descending; empty slots sort
    last."""
    slot = tl.arange(0, CAP)
    valid = slot < fill
    # Appends by other threads of this program must be visible before we read the list back.
    tl.debug_barrier()
    idx = tl.load(buf_ptr + slot, mask=valid, other=0)
    v = tl.load(row_ptr + idx, mask=valid, other=0.0).to(tl.float32)
    # Empty slots get distinct keys too (below every real key), so all keys are distinct.
    key = tl.where(valid, _candidate_key(v, idx), _KEY_EMPTY + slot.to(tl.int64))
    key = _sort_candidate_keys(key, CAP, INTERP)
    # Nobody may overwrite the list while another thread is still reading it.
    tl.debug_barrier()
    return key


@triton.jit
def _finish_window(row_ptr, buf_ptr, fill, C, c_minus_1, K_MIN, K_MAX, idx_out_ptr, k_out_ptr,
                   CAP: tl.constexpr, KM: tl.constexpr, INTERP: tl.constexpr):
    """Sorted window -> Kneedle knee -> k; store k and the first KM window indices."""
    key = _sorted_candidates(row_ptr, buf_ptr, fill, CAP, INTERP)
    slot = tl.arange(0, CAP)
    w = _candidate_key_value(key)
    idx = _candidate_key_index(key)
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
