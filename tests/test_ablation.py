"""The method comparison: its paired statistics on hand-computed numbers, its seed options, the stratified
eval split it scores on, and its plumbing end to end at a minimal size (teacher, two arms, two seeds)."""
import collections
import json
import math
import os
import re

import pytest
from assets import load_demo_module, run_module

from recipe.ablation import check_same_eval_split, comparisons, format_difference, paired_differences, parse_args


def test_paired_differences_by_hand():
    # Differences in points: 5, 5, -1. Mean 3; stdev sqrt((2^2 + 2^2 + 4^2) / 2) = sqrt(12); standard error
    # sqrt(12) / sqrt(3) = 2; t(0.975, 2 degrees of freedom) = 4.302653; interval 3 -+ 8.605305.
    result = paired_differences([0.30, 0.35, 0.32], [0.25, 0.30, 0.33])
    assert result["differences"] == pytest.approx([5, 5, -1])
    assert result["mean"] == pytest.approx(3)
    assert result["interval"] == pytest.approx([3 - 2 * 4.302653, 3 + 2 * 4.302653], abs=1e-5)
    assert (result["wins"], result["ties"], result["losses"], result["seeds"]) == (2, 0, 1, 3)
    assert format_difference(result) == "+3.0 [-5.6, +11.6], won 2/3: not resolved"
    # Five seeds: differences 2, 4, 6, 8, 0 (one tie): mean 4, stdev sqrt(10), t(0.975, 4) = 2.776445.
    five = paired_differences([0.52, 0.54, 0.56, 0.58, 0.50], [0.50] * 5)
    half = 2.776445 * math.sqrt(10) / math.sqrt(5)
    assert five["interval"] == pytest.approx([4 - half, 4 + half], abs=1e-5)
    assert (five["wins"], five["ties"], five["losses"]) == (4, 1, 0)
    assert format_difference(five) == "+4.0 [+0.1, +7.9], won 4/5 (1 tied): higher"
    # One seed: a difference, no interval.
    one = paired_differences([0.4], [0.5])
    assert one["interval"] is None and one["mean"] == pytest.approx(-10) and one["losses"] == 1
    assert format_difference(one) == "-10.0 [n/a], won 0/1: not resolved"
    lower = paired_differences([0.40, 0.41, 0.39], [0.50, 0.50, 0.50])
    assert lower["verdict"] == "lower" and format_difference(lower).endswith("won 0/3: lower")
    with pytest.raises(ValueError, match="same seeds"):
        paired_differences([0.4, 0.5], [0.5])


def test_comparisons_against_each_reference_that_ran():
    scores = {"sft": [0.2, 0.3], "dbild": [0.4, 0.4], "switchkd": [0.5, 0.3]}
    paired = comparisons(scores)
    assert set(paired) == {"sft", "dbild"}
    assert set(paired["sft"]) == {"dbild", "switchkd"} and set(paired["dbild"]) == {"sft", "switchkd"}
    assert paired["sft"]["switchkd"]["differences"] == pytest.approx([30, 0])
    assert paired["dbild"]["switchkd"]["differences"] == pytest.approx([10, -10])
    assert set(comparisons({"kd": [0.2], "switchkd": [0.3]})) == set()  # neither reference ran


def test_seed_options():
    assert parse_args([]).seeds == [0, 1, 2, 3, 4]
    assert parse_args(["--seeds", "3"]).seeds == [0, 1, 2]
    assert parse_args(["--first-seed", "5", "--seeds", "2"]).seeds == [5, 6]
    assert parse_args(["--first-seed", "5"]).seeds == [5, 6, 7, 8, 9]
    assert parse_args(["--seed-list", "7", "3"]).seeds == [7, 3]
    for bad in (["--seed-list", "1", "--seeds", "2"], ["--seed-list", "1", "1"], ["--seeds", "0"],
                ["--first-seed", "-2"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


def test_runs_from_another_eval_split_are_refused():
    teacher = {"n": 1500}
    check_same_eval_split(teacher, {"sft": [{"n": 1500}]}, {"sft": ["runs/sft/seed0"]})
    with pytest.raises(SystemExit, match="runs/sft/seed1 was evaluated on 300 questions, the teacher on 1500"):
        check_same_eval_split(teacher, {"sft": [{"n": 1500}, {"n": 300}]},
                              {"sft": ["runs/sft/seed0", "runs/sft/seed1"]})


def test_eval_split_is_stratified_and_train_does_not_depend_on_its_size(tmp_path):
    demo = load_demo_module()
    for n_eval in (20, 90):
        demo.build_demo(str(tmp_path / str(n_eval)), n_train=30, n_eval=n_eval, seed=4)
    for name in ("train.json", os.path.join("images", "train", "000007.png")):
        assert (tmp_path / "20" / "raw" / name).read_bytes() == (tmp_path / "90" / "raw" / name).read_bytes()
    records = json.loads((tmp_path / "90" / "raw" / "eval.json").read_text())
    strata = demo.eval_strata(demo.load_digit_splits(4)[1], demo.split_holdout(demo.arithmetic_questions(), 4)[1])
    counts = collections.defaultdict(collections.Counter)
    for record in records:
        scored, value = demo.stratum(record["conversations"], record["round_types"])
        assert scored == record["type"] and value in strata[scored]
        counts[scored][value] += 1
    assert sum(map(len, counts.values())) > 30
    for scored, values in counts.items():  # every answer of a type (every arithmetic question) equally often, +-1
        per_value = [values[value] for value in strata[scored]]
        assert max(per_value) - min(per_value) <= 1, (scored, per_value)


@pytest.mark.slow
def test_ablation_runs_reuses_across_seed_lists_and_writes_table_results_and_plot(tmp_path, demo_assets):
    out = str(tmp_path / "ablation")
    common = ["-m", "recipe.ablation", "--teacher-steps", "3", "--out", out, "--arms", "sft", "switchkd",
              "--teacher-init", demo_assets["teacher"], "--student-init", demo_assets["student"],
              "--set", f"data.train=[{demo_assets['train']}]", "--set", f"data.eval=[{demo_assets['eval']}]",
              "--set", "eval_max_samples=8", "--set", "micro_batch_size=4", "--set", "data.num_workers=0",
              "--set", "loss.candidates=16"]
    env = {"DS_ACCELERATOR": "cpu"}
    trained = []

    def ablation(*args, **kwargs):  # run it; note the runs it trained
        proc = run_module(common + list(args), env=env, **kwargs)
        trained.extend(re.findall(r"^\[ablation\] (\S+): training \(\d+s elapsed\)$", proc.stdout, re.M))
        return proc

    proc = ablation("--steps", "3", "--seeds", "1", timeout=900)
    assert trained == ["teacher", "sft/seed0", "switchkd/seed0"]
    table = open(os.path.join(out, "table.md")).read()
    assert "| teacher (SFT) |" in table and "| SFT |" in table and "| Switch-KD |" in table and table in proc.stdout
    assert "Seeds [0]" in table and "[n/a], won" in table
    results = json.load(open(os.path.join(out, "results.json")))
    assert results["seeds"] == [0] and set(results["arms"]) == {"sft", "switchkd"}
    for arm in ("sft", "switchkd"):
        report = json.load(open(os.path.join(out, arm, "seed0", "final", "eval.json")))
        assert report["n"] == 8 and report["step"] == 3 and results["arms"][arm] == [report["accuracy"]]
    switchkd = [json.loads(line) for line in open(os.path.join(out, "switchkd", "seed0", "metrics.jsonl"))]
    assert any(r.get("vsd", 0) > 0 for r in switchkd)
    with open(os.path.join(out, "ablation.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    # --first-seed runs the seeds it names, and only those.
    ablation("--steps", "3", "--first-seed", "1", "--seeds", "1", timeout=900)
    assert trained == ["teacher", "sft/seed0", "switchkd/seed0", "sft/seed1", "switchkd/seed1"]
    assert json.load(open(os.path.join(out, "results.json")))["seeds"] == [1]
    # A seed list that spans both reuses every finished run (nothing trains) and pairs them seed by seed.
    both = ablation("--steps", "3", "--seeds", "2", timeout=300)
    assert len(trained) == 5 and both.stdout.count(": reused") == 5
    results = json.load(open(os.path.join(out, "results.json")))
    assert results["seeds"] == [0, 1] and all(len(v) == 2 for v in results["arms"].values())
    runs = {arm: [json.load(open(os.path.join(out, arm, f"seed{s}", "final", "eval.json")))["accuracy"]
                  for s in (0, 1)] for arm in ("sft", "switchkd")}
    assert results["arms"] == runs
    expected = paired_differences(runs["switchkd"], runs["sft"])
    assert results["paired"]["sft"]["switchkd"]["differences"] == pytest.approx(expected["differences"])
    assert f"| Switch-KD | {format_difference(expected)} |" in both.stdout

    # More steps extend a finished run (resumed from its checkpoint) and evaluate it again ...
    ablation("--steps", "4", "--seeds", "1", "--arms", "sft", timeout=600)
    assert trained[-1] == "sft/seed0"
    sft_dir = os.path.join(out, "sft", "seed0")
    assert json.load(open(os.path.join(sft_dir, "final", "eval.json")))["step"] == 4
    steps = [r["step"] for r in map(json.loads, open(os.path.join(sft_dir, "metrics.jsonl"))) if "ce" in r]
    assert steps == [1, 2, 3, 4]
    assert "resumed from" in open(os.path.join(out, "train.log")).read()
    # ... while fewer steps than a run already has is refused rather than reported as that shorter run.
    fewer = ablation("--steps", "2", "--seeds", "1", "--arms", "sft", timeout=600, check=False)
    assert fewer.returncode != 0 and "holds a run of 4 steps, not the 2 asked for" in fewer.stderr

