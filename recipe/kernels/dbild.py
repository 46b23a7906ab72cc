"""Fused Triton DBiLD (docs/method.md, "DBiLD"); reference: recipe/losses/dbild.py. This file launches
the kernels and holds the autograd function; the kernels live in

- window_lanes.py: the window of almost every row, in one branch-free pass (lane lists);
- window_exact.py: the exact streaming top-C for the windows the lane kernel could not settle;
- window.py: what both share: the candidate keys, the sorted window, the knee and k;
- pairs.py: the pair loss and its gradient on the leading indices, and the backward's scatter.

Forward: each window launch covers (rows, both leading inputs: ref, then trainee), one program each;
the lane kernel, then the exact kernel (which skips the windows already settled), then the pair kernel.
Backward: the scatter writes <= 2 * k_max values per row into a zeroed gradient in the trainee's dtype.

Memory besides the gradient, all O(rows x candidates): scratch int32 (rows, 2, CAP), a flag and a
threshold per window, leading indices int32 (rows, 2, KM), k int32 (rows, 2), losses f32 (rows, 2),
gathered gradients f32 (rows, 2, KM), with KM = next power of two >= k_max. float64 (or other non
bf16/fp16/fp32) inputs and windows wider than MAX_TRITON_CANDIDATES run the torch reference instead.

Launch shapes and path choices come from a `DBiLDTuning` (recipe/kernels/tuning.py), by default
`DEFAULT_TUNING`.
"""
from __future__ import annotations

import contextlib
import os
import warnings

import torch

from recipe.kernels import _interpreter_compat
from recipe.kernels.pairs import _dbild_pairs_kernel, _dbild_scatter_kernel
from recipe.kernels.tuning import DEFAULT_TUNING, DBiLDTuning, next_pow2
from recipe.kernels.window_exact import _dbild_window_exact_kernel
from recipe.kernels.window_lanes import _dbild_window_kernel
from recipe.losses.dbild import check_logits, dbild_branches_torch, dbild_loss_torch

_interpreter_compat.apply()

# The pair softmax lives in registers as KM x KM tiles; above 128 it would spill, so larger windows
# (only used to check the whole-vocabulary definition on tiny vocabularies) go to the torch reference.
MAX_TRITON_CANDIDATES = 128

# The bits of +inf per input dtype: the lane kernel spots NaNs of float32 / fp16 rows by their bits.
_INF_BITS = {torch.bfloat16: 0x7F80, torch.float16: 0x7C00, torch.float32: 0x7F800000}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _launch_opts(opts: dict, device: torch.device) -> dict:
    # maxnreg is an NVIDIA (ptxas) option: drop it for the interpreter and for ROCm.
    if device.type != "cuda" or _interpreting() or torch.version.hip is not None:
        opts = {k: v for k, v in opts.items() if k != "maxnreg"}
    return opts


def _packed_rows(*leads: torch.Tensor) -> bool:
    """16-bit rows starting at 4-byte boundaries: the lane kernel can read them as int32 pairs."""
    return all(t.element_size() == 2 and t.stride(0) % 2 == 0 and t.data_ptr() % 4 == 0 for t in leads)


def _dbild_forward(ref, trainee, candidates, k_min, k_max, temperature, need_grad, tuning: DBiLDTuning):
    """Run the window and pair kernels. Returns per-row losses (rows, 2) f32, k (rows, 2) int32,
    leading indices (rows, 2, KM) int32, if need_grad d loss_row / d gathered trainee logits
    (rows, 2, KM) f32 (else None), and per window whether the lane kernel settled it (rows, 2) int32.
    Column 0 is the ref-led (teacher-led) branch, column 1 the trainee-led one."""
    rows, vocab = ref.shape
    candidates = min(candidates, vocab)
    k_max = candidates if k_max is None else min(k_max, candidates)
    km = max(2, next_pow2(k_max))
    dev = ref.device
    cap, sub, block = tuning.exact_config(vocab, candidates)
    scratch = torch.empty((rows, 2, cap), dtype=torch.int32, device=dev)
    ok = torch.zeros((rows, 2), dtype=torch.int32, device=dev)
    # Per window, a lower bound of its C-th value from the lane kernel: where the fallback starts its threshold.
    thr = torch.full((rows, 2), float("nan"), dtype=torch.float32, device=dev)
    idx = torch.empty((rows, 2, km), dtype=torch.int32, device=dev)
    k = torch.empty((rows, 2), dtype=torch.int32, device=dev)
    losses = torch.empty((rows, 2), dtype=torch.float32, device=dev)
    g = torch.empty((rows, 2, km) if need_grad else (1,), dtype=torch.float32, device=dev)
    interp = _interpreting() if tuning.interpreter_formulation is None else tuning.interpreter_formulation
    exact_opts = _launch_opts(tuning.exact_launch(), dev)
    # One launch of each window kernel over (rows, both inputs) when the two share a dtype; else one per input.
    if ref.dtype == trainee.dtype:
        launches = [((ref, trainee), 0)]
    else:
        launches = [((ref, ref), 0), ((trainee, trainee), 1)]
    for (x0, x1), first_slot in launches:
        grid = (rows, 2 if x0 is not x1 else 1)
        args = (x0, x1, x0.stride(0), x1.stride(0), first_slot, vocab, candidates, float(candidates - 1), k_min,
                k_max, scratch, idx, k, ok, thr)
        if tuning.use_lane_kernel:
            itemsize = x0.element_size()
            lanes, depth, groups = tuning.lane_config(vocab, candidates, itemsize)
            _dbild_window_kernel[grid](*args, CAP=cap, LANES=lanes, DEPTH=depth, G=groups, KM=km,
                                       KEY64=itemsize > 2, PACKED=_packed_rows(x0, x1),
                                       SUM_NAN=x0.dtype == torch.bfloat16, INF_BITS=_INF_BITS[x0.dtype],
                                       INTERP=interp, **_launch_opts(tuning.lane_launch(itemsize), dev))
        _dbild_window_exact_kernel[grid](*args, CAP=cap, SUB=sub, BLOCK=block, KM=km, INTERP=interp, **exact_opts)
    _dbild_pairs_kernel[(rows,)](ref, trainee, ref.stride(0), trainee.stride(0), idx, k, losses, g,
                                 1.0 / float(temperature), KM=km, NEED_GRAD=need_grad,
                                 **_launch_opts(tuning.pairs_launch(km), dev))
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
    def forward(ctx, ref, trainee, candidates, k_min, k_max, temperature, tuning):
        need_grad = bool(ctx.needs_input_grad[1])
        with torch.cuda.device(trainee.device) if trainee.is_cuda else contextlib.nullcontext():
            losses, k, idx, g, _ = _dbild_forward(ref, trainee, candidates, k_min, k_max, temperature, need_grad,
                                                  tuning)
        ctx.save_for_backward(idx, k, g if need_grad else losses.new_empty(0))
        ctx.shape, ctx.grad_dtype, ctx.tuning = trainee.shape, trainee.dtype, tuning
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
                                           **ctx.tuning.scatter_launch(km))
        return None, grad, None, None, None, None, None


def dbild_loss_triton(ref, trainee, *, candidates=64, k_min=2, k_max=None, temperature=3.0,
                      tuning: DBiLDTuning | None = None) -> torch.Tensor:
    """DBiLD(ref, trainee) with the fused kernels; same contract as `dbild_loss_torch`. tuning: launch
    shapes and paths (default `DEFAULT_TUNING`)."""
    check_logits(ref, trainee, candidates, k_min, k_max)
    if ref.shape[0] == 0:
        return trainee.sum() * 0.0
    if _use_reference(ref, trainee, candidates):
        return dbild_loss_torch(ref, trainee, candidates=candidates, k_min=k_min, k_max=k_max,
                                temperature=temperature)
    ref, trainee = _prepare(ref, trainee)
    return DBiLDTritonFunction.apply(ref, trainee, int(candidates), int(k_min),
                                     None if k_max is None else int(k_max), float(temperature),
                                     tuning or DEFAULT_TUNING)


def dbild_branches_triton(ref, trainee, *, candidates=64, k_min=2, k_max=None, temperature=3.0,
                          tuning: DBiLDTuning | None = None, return_fast_rows=False) -> dict[str, torch.Tensor]:
    """Per-row branch losses and k, like `dbild_branches_torch` (for tests and diagnostics; no grad).
    tuning as for `dbild_loss_triton`. return_fast_rows adds "fast_rows": per row, whether the
    trainee-led window was settled by the lane kernel."""
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
                                             tuning or DEFAULT_TUNING)
    k = k.long()
    out = {"ref_led_k": k[:, 0], "ref_led_loss": losses[:, 0],
           "trainee_led_k": k[:, 1], "trainee_led_loss": losses[:, 1]}
    if return_fast_rows:
        out["fast_rows"] = ok[:, 1].bool()
    return out
