"""tests/perf/bench_step.py: its FLOP model at the TinyLLaVA shape (the figures of issue #14, on the meta device),
and a run at the demo shape on the CPU through tests/perf/step_checks.sh (extended: outside the default run)."""
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from assets import REPO

PERF = os.path.join(REPO, "tests", "perf")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_step", os.path.join(PERF, "bench_step.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_flop_model_at_the_tinyllava_shape(bench, tmp_path):
    """1.04B / 3.8B parameters; the step's FLOPs: student forward and backward ~39 TF, teacher forward ~56 TF,
    switch forward and activation backward ~100 TF, about 180-200 TF in all (issue #14's estimates)."""
    shape = bench.SHAPES["tinyllava"]
    student, teacher = (bench.random_vlm(bench.vlm_config(shape, text), "meta", "bf16", "sdpa")
                        for text in (shape.student_text, shape.teacher_text))
    assert sum(p.numel() for p in student.parameters()) == pytest.approx(1.04e9, rel=0.01)
    assert sum(p.numel() for p in teacher.parameters()) == pytest.approx(3.8e9, rel=0.01)
    assert bench.synthetic_batch(shape)["labels"][:, 1:].ne(-100).sum() == 1272
    tera = {mode: bench.step_flops(bench.bench_config("tinyllava", mode, 1, [], str(tmp_path)), student,
                                   teacher if mode != "sft" else None, shape) / 1e12 for mode in ("sft", "switchkd")}
    assert 35 < tera["sft"] < 42
    teacher_forward = sum(f * (shape.supervised if part == "head" else 1)
                          for part, f in bench.forward_flops(teacher, shape).items()) / 1e12
    assert 50 < teacher_forward < 60
    assert 90 < tera["switchkd"] - tera["sft"] - teacher_forward < 105
    assert 180 < tera["switchkd"] < 200


@pytest.mark.extended
def test_step_checks_run_bench_step_at_the_demo_shape_on_the_cpu(bench, tmp_path, demo_assets):
    env = dict(os.environ, OUT=str(tmp_path), STEP_SHAPE="demo", STEP_DEVICE="cpu", DS_ACCELERATOR="cpu")
    proc = subprocess.run(["bash", os.path.join(PERF, "step_checks.sh")], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (tmp_path / "bench_step.log").read_text()
    results = {r["mode"]: r for r in (json.loads(line) for line in log.splitlines() if line.startswith("{"))}
    assert list(results) == ["switchkd", "sft", "switchkd_unchunked", "switchkd_gc"]
    assert "| mode | ms/step |" in log
    from recipe.models import load_vlm

    demo_params = {role: sum(p.numel() for p in load_vlm(demo_assets[role]).parameters())
                   for role in ("student", "teacher")}
    for mode, r in results.items():
        assert r["params"] == {**demo_params, **({"teacher": 0} if mode == "sft" else {})}, mode  # the demo pair
        assert math.isfinite(r["loss"]) and r["ms_per_step"] > 0 and r["tflop_per_step"] > 0 and r["mfu"] is None
        assert sum(r["phases_ms"].values()) == pytest.approx(r["ms_per_step"], rel=0.3)
        distilling = mode != "sft"
        assert (r["phases_ms"]["teacher"] > 0) == distilling and (r["phases_ms"]["switch"] > 0) == distilling
        assert all(r["phases_ms"][p] > 0 for p in ("student", "losses", "backward", "optimizer"))
    assert results["switchkd_unchunked"]["chunk_rows"] == 0 and results["switchkd_gc"]["gradient_checkpointing"]
    assert torch.isfinite(torch.tensor([r["loss"] for r in results.values()])).all()
