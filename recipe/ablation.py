"""A miniature of the paper's comparison on the demo data: the same student initialisation and data
budget trained six ways, evaluated on the demo eval split, mean +- std over seeds.

    python -m recipe.ablation [--seeds 3] [--steps 400] [--teacher-steps 3000] [--out runs/ablation]
    (launch/ablation.sh wraps it; every run is one process: world size 1, micro-batch 16)

Arms (CE is always on; D is the divergence of the alignment / VSD terms):
    sft          CE only
    kd           CE + vanilla KD (forward KL, full vocabulary) alignment
    bild         CE + BiLD alignment (top-8, forward KL on pair softmaxes)
    dbild        CE + DBiLD alignment
    switchkd     CE + DBiLD alignment + VSD (DBiLD through the teacher's switch pass)
    vsd          CE + VSD only
Writes OUT/results.json, OUT/table.md (printed too) and OUT/ablation.png. Finished runs are reused (and
shorter ones extended), so an interrupted experiment continues where it stopped.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from recipe import REPO_ROOT
from recipe.checkpoints import evaluated_step

ARMS = {
    "sft": {"loss.align_weight": 0, "loss.vsd_weight": 0, "teacher.path": None},
    "kd": {"loss.kind": "kl", "loss.align_weight": 1, "loss.vsd_weight": 0},
    "bild": {"loss.kind": "bild", "loss.align_weight": 1, "loss.vsd_weight": 0},
    "dbild": {"loss.kind": "dbild", "loss.align_weight": 1, "loss.vsd_weight": 0},
    "switchkd": {"loss.kind": "dbild", "loss.align_weight": 1, "loss.vsd_weight": 1},
    "vsd": {"loss.kind": "dbild", "loss.align_weight": 0, "loss.vsd_weight": 1},
}
LABELS = {"sft": "SFT", "kd": "Vanilla KD", "bild": "BiLD", "dbild": "DBiLD align", "switchkd": "Switch-KD",
          "vsd": "VSD only"}


def overrides(values: dict) -> list[str]:
    args = []
    for key, value in values.items():
        args += ["--set", f"{key}={'null' if value is None else value}"]
    return args


def train(config: str, out_dir: str, settings: dict, extra: list[str], log_path: str) -> None:
    """One training run (with its final evaluation on data.eval) in its own process, as DeepSpeed owns the
    process group; skipped when finished and evaluated at settings["max_steps"]; a shorter finished run
    is extended (the trainer resumes it)."""
    final = os.path.join(out_dir, "final")
    if evaluated_step(final) == settings["max_steps"]:
        return
    cmd = [sys.executable, "-m", "recipe.train", "--config", config,
           *overrides({"output_dir": out_dir, **settings}), *[a for o in extra for a in ("--set", o)]]
    with open(log_path, "a") as log:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"training failed ({' '.join(cmd)}); see {log_path}")
    trained = evaluated_step(final)
    if trained != settings["max_steps"]:
        raise SystemExit(f"{out_dir} holds a run of {trained} steps, not the {settings['max_steps']} "
                         f"asked for; remove it or choose another --out")


def accuracy(run_dir: str) -> dict:
    """The trainer's final evaluation on data.eval (final/eval.json): n, accuracy, per_type."""
    with open(os.path.join(run_dir, "final", "eval.json")) as f:
        return json.load(f)


def curve(run_dir: str) -> list[tuple[int, float]]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [(r["step"], r["ce"]) for r in map(json.loads, f) if "ce" in r]  # eval records have no ce


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def markdown_table(results: dict, teacher: dict, seeds: list[int]) -> str:
    types = sorted(teacher["per_type"])
    head = "| model | accuracy (%) | " + " | ".join(types) + " |"
    lines = [f"Demo eval split, {teacher['n']} questions; mean +- std over seeds {seeds}.", "",
             head, "|" + "---|" * (2 + len(types))]
    lines.append(f"| teacher (SFT) | {100 * teacher['accuracy']:.1f} | " +
                 " | ".join(f"{100 * teacher['per_type'][t]['accuracy']:.0f}" for t in types) + " |")
    for arm, runs in results.items():
        mean, std = mean_std([100 * r["accuracy"] for r in runs])
        per_type = [statistics.mean(100 * r["per_type"][t]["accuracy"] for r in runs) for t in types]
        lines.append(f"| {LABELS[arm]} | {mean:.1f} +- {std:.1f} | " + " | ".join(f"{v:.0f}" for v in per_type) + " |")
    return "\n".join(lines)


def plot(results: dict, teacher: dict, run_dirs: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bars, losses) = plt.subplots(1, 2, figsize=(12, 4.5))
    arms = list(results)
    stats = [mean_std([100 * r["accuracy"] for r in results[a]]) for a in arms]
    bars.bar([LABELS[a] for a in arms], [m for m, _ in stats], yerr=[s for _, s in stats], capsize=4,
             color=["#999999" if a == "sft" else "#d62728" if a == "switchkd" else "#1f77b4" for a in arms])
    bars.axhline(100 * teacher["accuracy"], color="black", linestyle="--", label="teacher")
    bars.set_ylabel("eval accuracy (%)")
    bars.set_title("Demo student, mean +- std over seeds")
    bars.tick_params(axis="x", rotation=30)
    bars.legend()
    for arm in arms:
        steps, ce = zip(*curve(run_dirs[arm][0]))
        losses.plot(steps, ce, label=LABELS[arm])
    losses.set_xlabel("optimizer step")
    losses.set_ylabel("student CE (train)")
    losses.set_title(f"Training CE ({os.path.basename(run_dirs[arms[0]][0])})")
    losses.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    # Sized for a 2-core CPU: a teacher trained ~7x longer than each student run (~26 points apart under
    # SFT), 3 seeds x 6 arms in about half an hour.
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps of each student run")
    parser.add_argument("--teacher-steps", type=int, default=3000, help="optimizer steps of the teacher's SFT")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--teacher-init", default="demo/models/teacher_init", help="teacher before its SFT")
    parser.add_argument("--student-init", default="demo/models/student_init", help="the one student initialisation")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every run, e.g. --set data.train=[DIR] (repeatable)")
    parser.add_argument("--out", default=os.path.join(REPO_ROOT, "runs", "ablation"))
    args = parser.parse_args(argv)

    os.makedirs(args.out, exist_ok=True)
    log = os.path.join(args.out, "train.log")
    configs = os.path.join(REPO_ROOT, "recipe", "configs")
    started = time.time()

    teacher_dir = os.path.join(args.out, "teacher")
    settings = {"student.path": args.teacher_init, "max_steps": args.teacher_steps}
    print(f"[ablation] teacher -> {teacher_dir}", flush=True)
    train(os.path.join(configs, "demo_teacher.yaml"), teacher_dir, settings, args.overrides, log)
    teacher = accuracy(teacher_dir)

    results, run_dirs = {}, {}
    seeds = list(range(args.seeds))
    for arm in args.arms:
        for seed in seeds:
            run_dir = os.path.join(args.out, arm, f"seed{seed}")
            settings = {"seed": seed, "student.path": args.student_init, "max_steps": args.steps,
                        "teacher.path": os.path.join(teacher_dir, "final"), **ARMS[arm]}
            print(f"[ablation] {arm} seed {seed} ({time.time() - started:.0f}s elapsed)", flush=True)
            train(os.path.join(configs, "demo_switchkd.yaml"), run_dir, settings, args.overrides, log)
            results.setdefault(arm, []).append(accuracy(run_dir))
            run_dirs.setdefault(arm, []).append(run_dir)

    table = markdown_table(results, teacher, seeds)
    print("\n" + table + "\n", flush=True)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table + "\n")
    summary = {"teacher": teacher["accuracy"], "seeds": seeds, "elapsed_s": time.time() - started,
               "arms": {arm: [r["accuracy"] for r in runs] for arm, runs in results.items()}}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(summary, f, indent=1)
    plot(results, teacher, run_dirs, os.path.join(args.out, "ablation.png"))
    print(f"[ablation] wrote {args.out}/table.md, results.json, ablation.png in {time.time() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
