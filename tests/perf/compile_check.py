"""Compile the DBiLD kernels for an NVIDIA target without a GPU, and report ptxas registers and spills.

The CPU interpreter (TRITON_INTERPRET=1) checks what the kernels compute but not that they compile:
this runs the real pipeline (Triton -> TTIR -> TTGIR -> LLVM -> PTX -> ptxas) with the ptxas bundled
in the triton wheel, using the launch options of the default tuning (recipe/kernels/tuning.py). Run it
in a process WITHOUT TRITON_INTERPRET (the interpreter replaces @triton.jit functions), with the project
installed (pip install -e .):

    env -u TRITON_INTERPRET python tests/perf/compile_check.py [--dtypes bf16 fp16 fp32] [--km 64 128]

One JSON line per kernel: registers, spills, shared memory and, for the lane kernel, the SASS of its
block loop (instructions per logit and opcode counts). tests/perf/README.md records the results.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile

_DIV16 = [["tt.divisibility", 16]]


def _ptxas_report(ptx: str, arch: int) -> dict:
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}a", src, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", out)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
    return {"registers": int(regs.group(1)) if regs else None,
            "spill_store_bytes": int(spill.group(1)) if spill else None,
            "spill_load_bytes": int(spill.group(2)) if spill else None}


def _block_loop_mix(cubin: bytes, logits_per_iteration: int) -> dict:
    """SASS of the loop that loads the row (the backward branch whose body holds the LDG): instructions
    per logit per thread and the opcode counts, from the nvdisasm bundled with triton."""
    import triton

    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        listing = subprocess.run([nvdisasm, "-c", path], capture_output=True, text=True, check=True).stdout
    instructions, labels = [], {}
    for line in listing.splitlines():
        label = re.match(r"\s*(\.L_x_\d+):", line)
        if label:
            labels[label.group(1)] = len(instructions)
        code = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;", line)
        if code:
            instructions.append(re.sub(r"^@!?U?P\w+\s+", "", code.group(1)))
    loops = []
    for end, text in enumerate(instructions):
        target = re.search(r"BRA\s.*?(\.L_x_\d+)", text)
        if target and labels.get(target.group(1), end + 1) <= end:
            loops.append(instructions[labels[target.group(1)]:end + 1])
    body = max((b for b in loops if any(i.startswith("LDG") for i in b)), key=len, default=[])
    opcodes: dict[str, int] = {}
    for text in body:
        op = text.split()[0].split(".")[0]
        opcodes[op] = opcodes.get(op, 0) + 1
    return {"block_loop_sass_per_logit": round(len(body) / logits_per_iteration, 2),
            "block_loop_opcodes": dict(sorted(opcodes.items(), key=lambda kv: -kv[1]))}


def _compile(fn, signature: dict, constexprs: dict, divisible: tuple, options: dict, arch: int,
             loop_logits: int | None = None) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = dict(signature)
    for name in constexprs:
        sig[name] = "constexpr"
    attrs = {(fn.arg_names.index(n),): _DIV16 for n in divisible}
    kernel = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=GPUTarget("cuda", arch, 32), options=options)
    report = {"kernel": fn.__name__, **{k: v for k, v in constexprs.items()}, **options,
              "shared_bytes": kernel.metadata.shared}
    report.update(_ptxas_report(kernel.asm["ptx"], arch))
    if loop_logits:
        report.update(_block_loop_mix(kernel.asm["cubin"], loop_logits))
    return report


def _kernels() -> tuple:
    from recipe.kernels.pairs import _dbild_pairs_kernel, _dbild_scatter_kernel
    from recipe.kernels.window_exact import _dbild_window_exact_kernel
    from recipe.kernels.window_lanes import _dbild_window_kernel

    return _dbild_window_kernel, _dbild_window_exact_kernel, _dbild_pairs_kernel, _dbild_scatter_kernel


def check_globals() -> None:
    """What JITFunction.run checks at every launch (and cannot be exercised without a GPU): computing
    cache_key walks the callees and rejects conflicting globals; then every global a kernel read must
    still compare equal to itself (a NaN constexpr, for instance, never does)."""
    for fn in _kernels():
        _ = fn.cache_key
        for (name, _), (val, globals_dict) in fn.used_global_vals.items():
            if globals_dict.get(name) != val:
                raise RuntimeError(f"{fn.__name__}: global {name}={val!r} would fail Triton's launch-time check")


def compile_all(dtypes=("bf16",), kms=(64,), arch: int = 90) -> list[dict]:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter replaces the kernels being compiled")
    import torch

    from recipe.kernels.dbild import _INF_BITS
    from recipe.kernels.tuning import DEFAULT_TUNING as tuning

    window_kernel, exact_kernel, pairs_kernel, scatter_kernel = _kernels()
    check_globals()
    reports = []

    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    window_sig = {"x0_ptr": "*{dt}", "x1_ptr": "*{dt}", "stride0": "i32", "stride1": "i32", "first_slot": "i32",
                  "V": "i32", "C": "i32", "c_minus_1": "fp32", "K_MIN": "i32", "K_MAX": "i32", "scratch_ptr": "*i32",
                  "idx_out_ptr": "*i32", "k_out_ptr": "*i32", "ok_ptr": "*i32", "thr_ptr": "*fp32"}
    window_div = ("x0_ptr", "x1_ptr", "stride0", "stride1", "V", "scratch_ptr", "idx_out_ptr", "k_out_ptr", "ok_ptr",
                  "thr_ptr")
    for dt in dtypes:
        itemsize = torch_dtype[dt].itemsize
        for km in kms:
            cap, sub, block = tuning.exact_config(151936, km)
            lanes, depth, groups = tuning.lane_config(151936, km, itemsize)
            lane_launch = tuning.lane_launch(itemsize)
            sig = {k: v.format(dt=dt) for k, v in window_sig.items()}
            reports.append(_compile(
                window_kernel, sig,
                {"CAP": cap, "LANES": lanes, "DEPTH": depth, "G": groups, "KM": km, "KEY64": itemsize > 2,
                 "PACKED": itemsize == 2, "SUM_NAN": dt == "bf16", "INF_BITS": _INF_BITS[torch_dtype[dt]],
                 "INTERP": False},
                window_div, lane_launch, arch, loop_logits=lanes // (32 * lane_launch["num_warps"])))
            reports.append(_compile(
                exact_kernel, sig, {"CAP": cap, "SUB": sub, "BLOCK": block, "KM": km, "INTERP": False},
                window_div, tuning.exact_launch(), arch))
            for need_grad in (True, False):
                reports.append(_compile(
                    pairs_kernel,
                    {"ref_ptr": f"*{dt}", "trn_ptr": f"*{dt}", "stride_r": "i32", "stride_t": "i32", "idx_ptr": "*i32",
                     "k_ptr": "*i32", "loss_ptr": "*fp32", "g_ptr": "*fp32", "inv_tau": "fp32"},
                    {"KM": km, "NEED_GRAD": need_grad}, ("ref_ptr", "trn_ptr", "stride_r", "stride_t"),
                    tuning.pairs_launch(km), arch))
            reports.append(_compile(
                scatter_kernel,
                {"grad_ptr": f"*{dt}", "stride_g": "i32", "idx_ptr": "*i32", "k_ptr": "*i32", "g_ptr": "*fp32",
                 "grad_out_ptr": "*fp32", "inv_rows": "fp32"},
                {"KM": km}, ("grad_ptr", "stride_g"), tuning.scatter_launch(km), arch))
    return reports


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", nargs="+", default=["bf16"], choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--km", nargs="+", type=int, default=[64], help="padded k_max / candidates (power of two)")
    ap.add_argument("--arch", type=int, default=90)
    args = ap.parse_args()
    for report in compile_all(tuple(args.dtypes), tuple(args.km), args.arch):
        print(json.dumps(report))


if __name__ == "__main__":
    main()
