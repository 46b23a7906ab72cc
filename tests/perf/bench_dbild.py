"""DBiLD forward + backward: torch reference vs fused Triton kernels (see tests/perf/README.md).

    python tests/perf/bench_dbild.py --rows 1024 4096 16384 --vocab 151936 --candidates 64 --dtype bf16
    python tests/perf/bench_dbild.py --device cpu --rows 64 --vocab 4099     # interpreter smoke only

On CUDA: CUDA-event timings (warm-up, then the median of --repeats), extra peak memory over the inputs
(the gradient, which both implementations must produce, is shown beside it), and the fraction of the
memory-bandwidth bound (read ref and trainee, write the gradient: 3 x rows x V x itemsize bytes at the
device copy rate measured here). On CPU the kernels run under TRITON_INTERPRET=1 (set by this script):
wall time only, a functional smoke check, not a performance number.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from recipe.kernels.tuning import DBiLDTuning

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _lane_shape(text: str) -> DBiLDTuning:
    """DEPTHxLANESxWARPSxMAXNREG, e.g. 3x2048x8x64, as the tuning that sets those four lane-kernel fields."""
    parts = text.lower().split("x")
    if len(parts) != 4 or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r}: expected DEPTHxLANESxWARPSxMAXNREG, e.g. 3x2048x8x64")
    depth, lanes, warps, maxnreg = (int(p) for p in parts)
    try:
        return DBiLDTuning(lane_depth=depth, lanes=lanes, lane_warps=warps, lane_maxnreg=maxnreg)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r}: {err}") from None


def _parse():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--candidates", type=int, default=64)
    ap.add_argument("--k-max", type=int, default=None, help="default: = candidates")
    ap.add_argument("--temperature", type=float, default=3.0)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--repeats", type=int, default=None, help="timed iterations (default 20 on cuda, 1 on cpu)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed iterations (default 3 on cuda, 1 on cpu)")
    ap.add_argument("--inputs", choices=["randn", "peaked"], default="randn",
                    help="randn: i.i.d. logits (few blocks skipped: the top-C threshold rises slowly); "
                         "peaked: a few dozen high logits per row over a Gaussian bulk, trainee = ref + noise")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", action="store_true",
                    help="CUDA: also print the GPU time of each kernel of one triton step (torch.profiler)")
    ap.add_argument("--sweep", nargs="+", default=None, metavar="DEPTHxLANESxWARPSxMAXNREG", type=_lane_shape,
                    help="time the triton step for each lane-kernel shape, e.g. 3x2048x8x64 4x1024x8x64 "
                         "(DBiLDTuning's lane_depth, lanes, lane_warps, lane_maxnreg: recipe/kernels/tuning.py)")
    return ap.parse_args()


def main() -> None:
    args = _parse()
    if args.device == "cpu":
        # Must precede the first import of triton / of the kernels module.
        os.environ["TRITON_INTERPRET"] = "1"

    import torch

    from recipe.kernels import dbild_loss_triton, triton_available
    from recipe.losses.dbild import dbild_loss_torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: use --device cpu for the interpreter smoke run")
    if not triton_available():
        sys.exit("triton is not available")
    repeats = args.repeats if args.repeats is not None else (20 if args.device == "cuda" else 1)
    warmup = args.warmup if args.warmup is not None else (3 if args.device == "cuda" else 1)
    dtype = getattr(torch, DTYPES[args.dtype])
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    kw = dict(candidates=args.candidates, k_max=args.k_max, temperature=args.temperature)
    impls = {"torch": dbild_loss_torch, "triton": dbild_loss_triton}

    copy_gbps = _copy_rate_gbps(torch, dev) if cuda else None
    results = []
    for rows in args.rows:
        ref, trainee = _inputs(torch, rows, args.vocab, dtype, dev, args.inputs, args.seed)
        itemsize = ref.element_size()
        res = {"rows": rows, "vocab": args.vocab, "candidates": args.candidates, "k_max": args.k_max or args.candidates,
               "dtype": args.dtype, "device": args.device, "inputs": args.inputs, "repeats": repeats}
        losses = {}
        for name, fn in impls.items():
            ms, loss, peak = _time(torch, fn, ref, trainee, kw, warmup, repeats, cuda)
            losses[name] = loss
            res[f"{name}_ms"] = round(ms, 4)
            if cuda:
                res[f"{name}_extra_peak_GB"] = round(peak / 1e9, 4)
        res["loss_abs_diff"] = abs(losses["torch"] - losses["triton"])
        res["fast_rows"] = _fast_row_fraction(ref, trainee, kw)
        if cuda:
            res["speedup"] = round(res["torch_ms"] / res["triton_ms"], 2)
            res["grad_GB"] = round(rows * args.vocab * trainee.element_size() / 1e9, 4)
            res["copy_GBps"] = round(copy_gbps, 1)
            res["bound_ms"] = round(3 * rows * args.vocab * itemsize / (copy_gbps * 1e9) * 1e3, 4)
            res["triton_frac_of_bound"] = round(res["bound_ms"] / res["triton_ms"], 3)
        results.append(res)
        if cuda and args.profile:
            _print_profile(torch, dbild_loss_triton, ref, trainee, kw, rows)
        if args.sweep:
            _sweep(torch, dbild_loss_triton, ref, trainee, kw, args.sweep, warmup, repeats, res, cuda)
        del ref, trainee
        if cuda:
            torch.cuda.empty_cache()

    _print_table(results, cuda)
    for res in results:
        print(json.dumps(res))


def _inputs(torch, rows, vocab, dtype, dev, kind, seed):
    gen = torch.Generator(device=dev).manual_seed(seed)
    ref = torch.randn(rows, vocab, generator=gen, device=dev) * 3.0
    if kind == "peaked":
        ref = ref * (2.0 / 3.0)
        hot = torch.randint(0, vocab, (rows, 32), generator=gen, device=dev)
        ref.scatter_(1, hot, 10.0 + 4.0 * torch.rand(rows, 32, generator=gen, device=dev))
        trainee = ref + torch.randn(rows, vocab, generator=gen, device=dev)
    else:
        trainee = torch.randn(rows, vocab, generator=gen, device=dev) * 3.0
    return ref.to(dtype), trainee.to(dtype).requires_grad_(True)


def _copy_rate_gbps(torch, dev) -> float:
    """Device copy rate (bytes read + written per second) copying a 2 GiB buffer, median of 10."""
    src = torch.empty(2**30 // 2, dtype=torch.float32, device=dev).normal_()
    dst = torch.empty_like(src)
    times = []
    for i in range(13):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        stop.record()
        torch.cuda.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(stop) / 1e3)
    moved = 2 * src.numel() * src.element_size()  # read src + write dst: 4 GiB per copy
    del src, dst
    return moved / statistics.median(times) / 1e9


def _time(torch, fn, ref, trainee, kw, warmup, repeats, cuda):
    def step():
        trainee.grad = None
        loss = fn(ref, trainee, **kw)
        loss.backward()
        return loss

    for _ in range(warmup):
        step()
    peak = None
    if cuda:
        torch.cuda.synchronize()
        trainee.grad = None
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()  # the inputs (and nothing else of ours)
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    times, loss = [], None
    for _ in range(repeats):
        if cuda:
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            loss = step()
            stop.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(stop))
        else:
            t0 = time.perf_counter()
            loss = step()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), float(loss.detach()), peak


def _fast_row_fraction(ref, trainee, kw):
    """Share of trainee-led windows the one-pass lane kernel settled (the rest reran in the exact kernel)."""
    from recipe.kernels import dbild_branches_triton

    parts = dbild_branches_triton(ref, trainee.detach(), **kw, return_fast_rows=True)
    return round(float(parts["fast_rows"].float().mean()), 4) if "fast_rows" in parts else None


def _print_profile(torch, fn, ref, trainee, kw, rows):
    """GPU time per kernel over 5 steps (forward + backward), averaged per step."""
    from torch.profiler import ProfilerActivity, profile

    steps = 5
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            trainee.grad = None
            fn(ref, trainee, **kw).backward()
        torch.cuda.synchronize()
    totals = {}
    for event in prof.events():
        if event.device_type.name == "CUDA":  # kernels and memsets; their time range is on the device
            totals[event.name] = totals.get(event.name, 0.0) + event.time_range.elapsed_us() / 1e3 / steps
    print(f"rows {rows}: GPU ms per step by kernel (sum {sum(totals.values()):.3f})")
    for name, ms in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"  {ms:8.3f}  {name[:90]}")
    if not totals:
        print(prof.key_averages().table(sort_by="device_time_total", row_limit=15))


def _sweep(torch, fn, ref, trainee, kw, tunings, warmup, repeats, res, cuda):
    for tuning in tunings:
        tuned = dict(kw, tuning=tuning)
        ms, _, _ = _time(torch, fn, ref, trainee, tuned, warmup, repeats, cuda)
        shape = f"{tuning.lane_depth}x{tuning.lanes}x{tuning.lane_warps}x{tuning.lane_maxnreg}"
        row = {"rows": res["rows"], "shape": shape, "triton_ms": round(ms, 4),
               "fast_rows": _fast_row_fraction(ref, trainee, tuned)}
        if cuda:
            row["triton_frac_of_bound"] = round(res["bound_ms"] / ms, 3)
        print("sweep " + json.dumps(row))


def _print_table(results, cuda):
    if cuda:
        head = ["rows", "vocab", "C", "dtype", "torch ms", "triton ms", "speedup", "bound ms", "bound / triton",
                "torch extra GB", "triton extra GB", "grad GB", "|dloss|"]
        rows = [[r["rows"], r["vocab"], r["candidates"], r["dtype"], r["torch_ms"], r["triton_ms"], r["speedup"],
                 r["bound_ms"], f'{r["triton_frac_of_bound"]:.0%}', r["torch_extra_peak_GB"],
                 r["triton_extra_peak_GB"], r["grad_GB"], f'{r["loss_abs_diff"]:.1e}'] for r in results]
        print(f'copy rate {results[0]["copy_GBps"]} GB/s (read + write)' if results else "")
    else:
        head = ["rows", "vocab", "C", "dtype", "torch wall ms", "triton (interpreter) wall ms", "|dloss|"]
        rows = [[r["rows"], r["vocab"], r["candidates"], r["dtype"], r["torch_ms"], r["triton_ms"],
                 f'{r["loss_abs_diff"]:.1e}'] for r in results]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")


if __name__ == "__main__":
    main()
