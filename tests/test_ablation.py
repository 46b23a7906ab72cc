"""The ablation experiment's plumbing end to end at a minimal size: teacher, two arms, one seed."""
import json
import os

import pytest
from assets import run_module

pytestmark = pytest.mark.slow


def test_ablation_runs_and_writes_table_results_and_plot(tmp_path, demo_assets):
    out = str(tmp_path / "ablation")
    common = ["-m", "recipe.ablation", "--seeds", "1", "--teacher-steps", "3", "--out", out,
              "--teacher-init", demo_assets["teacher"], "--student-init", demo_assets["student"],
              "--set", f"data.train=[{demo_assets['train']}]", "--set", f"data.eval=[{demo_assets['eval']}]",
              "--set", "eval_max_samples=8", "--set", "micro_batch_size=4", "--set", "data.num_workers=0",
              "--set", "loss.candidates=16"]
    env = {"DS_ACCELERATOR": "cpu"}
    proc = run_module(common + ["--steps", "3", "--arms", "sft", "switchkd"], env=env, timeout=900)
    table = open(os.path.join(out, "table.md")).read()
    assert "| teacher (SFT) |" in table and "| SFT |" in table and "| Switch-KD |" in table
    assert table in proc.stdout
    results = json.load(open(os.path.join(out, "results.json")))
    assert set(results["arms"]) == {"sft", "switchkd"} and all(len(v) == 1 for v in results["arms"].values())
    for arm in ("sft", "switchkd"):
        report = json.load(open(os.path.join(out, arm, "seed0", "final", "eval.json")))
        assert report["n"] == 8 and report["step"] == 3 and results["arms"][arm] == [report["accuracy"]]
    switchkd = [json.loads(line) for line in open(os.path.join(out, "switchkd", "seed0", "metrics.jsonl"))]
    assert any(r.get("vsd", 0) > 0 for r in switchkd)
    with open(os.path.join(out, "ablation.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # Rerunning with the same steps reuses every finished run: nothing trains.
    log = os.path.join(out, "train.log")
    log_size = os.path.getsize(log)
    again = run_module(common + ["--steps", "3", "--arms", "sft", "switchkd"], env=env, timeout=300)
    assert table in again.stdout and os.path.getsize(log) == log_size
    # More steps extend a finished run (resumed from its checkpoint) and evaluate it again ...
    run_module(common + ["--steps", "4", "--arms", "sft"], env=env, timeout=600)
    sft_dir = os.path.join(out, "sft", "seed0")
    assert json.load(open(os.path.join(sft_dir, "final", "eval.json")))["step"] == 4
    steps = [r["step"] for r in map(json.loads, open(os.path.join(sft_dir, "metrics.jsonl"))) if "ce" in r]
    assert steps == [1, 2, 3, 4]
    assert "resumed from" in open(log).read()
    # ... while fewer steps than a run already has is refused rather than reported as that shorter run.
    fewer = run_module(common + ["--steps", "2", "--arms", "sft"], env=env, timeout=600, check=False)
    assert fewer.returncode != 0 and "holds a run of 4 steps, not the 2 asked for" in fewer.stderr
