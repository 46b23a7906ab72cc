"""The ablation experiment's plumbing end to end at a minimal size: teacher, two arms, one seed."""
import json
import os

import pytest

from assets import run_module

pytestmark = pytest.mark.slow


def test_ablation_runs_and_writes_table_results_and_plot(tmp_path, demo_assets):
    out = str(tmp_path / "ablation")
    proc = run_module(["-m", "recipe.ablation", "--seeds", "1", "--steps", "3", "--teacher-steps", "3",
                       "--arms", "sft", "switchkd", "--out", out,
                       "--teacher-init", demo_assets["teacher"], "--student-init", demo_assets["student"],
                       "--set", f"data.train=[{demo_assets['train']}]", "--set", f"data.eval=[{demo_assets['eval']}]",
                       "--set", "eval_max_samples=8", "--set", "micro_batch_size=4", "--set", "data.num_workers=0",
                       "--set", "loss.candidates=16"], env={"DS_ACCELERATOR": "cpu"}, timeout=900)
    table = open(os.path.join(out, "table.md")).read()
    assert "| teacher (SFT) |" in table and "| SFT |" in table and "| Switch-KD |" in table
    assert table in proc.stdout
    results = json.load(open(os.path.join(out, "results.json")))
    assert set(results["arms"]) == {"sft", "switchkd"} and all(len(v) == 1 for v in results["arms"].values())
    for arm in ("sft", "switchkd"):
        report = json.load(open(os.path.join(out, arm, "seed0", "final", "eval.json")))
        assert report["n"] == 8 and results["arms"][arm] == [report["accuracy"]]
    switchkd = [json.loads(line) for line in open(os.path.join(out, "switchkd", "seed0", "metrics.jsonl"))]
    assert any(r.get("vsd", 0) > 0 for r in switchkd)
    with open(os.path.join(out, "ablation.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # Rerunning reuses every finished run.
    again = run_module(["-m", "recipe.ablation", "--seeds", "1", "--arms", "sft", "switchkd", "--out", out,
                        "--teacher-init", demo_assets["teacher"], "--student-init", demo_assets["student"]],
                       env={"DS_ACCELERATOR": "cpu"}, timeout=300)
    assert table in again.stdout
