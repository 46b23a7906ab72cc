"""A miniature of the paper's comparison on the demo data: the same student initialisation and data
budget trained six ways, each scored on the demo eval split, compared seed by seed.

    python -m recipe.ablation [--seeds 5] [--first-seed 0 | --seed-list S [S ...]] [--steps 400]
                              [--teacher-steps 3000] [--arms ...] [--out runs/ablation]
    (launch/ablation.sh wraps it; every run is one process: world size 1, micro-batch 16)

Arms (CE is always on; D is the divergence of the alignment / VSD terms):
    sft          CE only
    kd           CE + vanilla KD (forward KL, full vocabulary) alignment
    bild         CE + BiLD alignment (top-8, forward KL on pair softmaxes)
    dbild        CE + DBiLD alignment
    switchkd     CE + DBiLD alignment + VSD (DBiLD through the teacher's switch pass)
    vsd          CE + VSD only

A seed sets the data order (and nothing else: the student initialisation is one), and every arm of a seed
sees that order, so arms are compared in pairs: per seed, an arm's accuracy minus the reference's (SFT, and
DBiLD alignment), then the mean of those differences over seeds with a 95% t interval (n - 1 degrees of
freedom) and the number of seeds the arm won. A run's score is its final evaluation on data.eval.

Writes OUT/results.json, OUT/table.md (printed too), OUT/ablation.png and OUT/curves.png (recipe.plot of
each arm's first seed). Runs live in OUT/ARM/seedS and are reused whatever seed list asks for them; shorter
ones are extended, so an interrupted experiment continues where it stopped and new seeds add to the finished
ones.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

from scipy.stats import t as student_t

from recipe import REPO_ROOT
from recipe.checkpoints import evaluated_step
from recipe.config import add_set_argument
from recipe.plot import plot_runs

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
REFERENCES = ("sft", "dbild")  # every arm is compared with these, seed by seed
CONFIDENCE = 0.95


def overrides(values: dict) -> list[str]:
    args = []
    for key, value in values.items():
        args += ["--set", f"{key}={'null' if value is None else value}"]
    return args


def train(config: str, out_dir: str, settings: dict, extra: list[str], log_path: str, name: str,
          started: float) -> None:
    """One training run (with its final evaluation on data.eval) in its own process, as DeepSpeed owns the
    process group; reused when finished and evaluated at settings["max_steps"]; a shorter finished run
    is extended (the trainer resumes it). Says which on stdout: "[ablation] NAME: reused" or
"[ablation] NAME: training (Ns elapsed)", N counted from `started`."""
    final = os.path.join(out_dir, "final")
    if evaluated_step(final) == settings["max_steps"]:
        print(f"[ablation] {name}: reused", flush=True)
        return
    print(f"[ablation] {name}: training ({time.time() - started:.0f}s elapsed)", flush=True)
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


def binomial_error(n: int) -> float:
    """The largest standard error, in points, of one run's accuracy on n questions (at accuracy 50%)."""
    return 100 * math.sqrt(0.25 / n)


# ---------------------------------------------------------------------------------------------------
# Paired comparison


def paired_differences(arm: list[float], reference: list[float]) -> dict:
    """The arm against the reference, seed by seed (both lists in seed order, accuracies as fractions).

    differences: arm minus reference per seed, in points; mean: their mean; interval: the 95% t interval of
    the mean, mean -+ t(0.975, n - 1) * stdev / sqrt(n), None for a single seed; wins / ties / losses:
    seeds on which the arm scored higher than / the same as / lower than the reference; verdict: what the
    interval supports (see verdict)."""
    if len(arm) != len(reference) or not arm:
        raise ValueError(f"need the same seeds for both, got {len(arm)} and {len(reference)} scores")
    differences = [100 * (a - r) for a, r in zip(arm, reference)]
    n = len(differences)
    mean = statistics.mean(differences)
    interval = None
    if n > 1:
        half = student_t.ppf((1 + CONFIDENCE) / 2, n - 1) * statistics.stdev(differences) / math.sqrt(n)
        interval = [mean - half, mean + half]
    result = {"differences": differences, "mean": mean, "interval": interval, "seeds": n,
              "wins": sum(a > r for a, r in zip(arm, reference)), "ties": sum(a == r for a, r in zip(arm, reference)),
              "losses": sum(a < r for a, r in zip(arm, reference))}
    return {**result, "verdict": verdict(result)}


def comparisons(scores: dict[str, list[float]]) -> dict:
    """{reference: {arm: paired_differences(arm, reference)}} for each of REFERENCES that was run."""
    return {ref: {arm: paired_differences(values, scores[ref]) for arm, values in scores.items() if arm != ref}
            for ref in REFERENCES if ref in scores}


def verdict(comparison: dict) -> str:
    """What the interval supports: "higher" or "lower" when it excludes 0, else "not resolved"."""
    interval = comparison["interval"]
    if interval is not None and interval[0] > 0:
        return "higher"
    if interval is not None and interval[1] < 0:
        return "lower"
    return "not resolved"


def format_difference(comparison: dict) -> str:
    """e.g. "+4.2 [+1.0, +7.4], won 5/5: higher" (ties, when there are any, after the wins)."""
    text = f"{comparison['mean']:+.1f}"
    text += " [n/a]" if comparison["interval"] is None else " [{:+.1f}, {:+.1f}]".format(*comparison["interval"])
    text += f", won {comparison['wins']}/{comparison['seeds']}"
    return text + (f" ({comparison['ties']} tied)" if comparison["ties"] else "") + f": {verdict(comparison)}"


# ---------------------------------------------------------------------------------------------------
# Report


def markdown_table(results: dict, teacher: dict, seeds: list[int], paired: dict) -> str:
    types = sorted(teacher["per_type"])
    n = teacher["n"]
    lines = [f"Demo eval split, {n} questions (one run's binomial standard error at most "
             f"{binomial_error(n):.1f} points); a run's score is its final evaluation. Seeds {seeds}: each sets "
             f"the data order, shared by every arm; the student initialisation is one.", "",
             "| model | accuracy (%), mean +- std | per seed | " + " | ".join(types) + " |",
             "|" + "---|" * (3 + len(types))]
    lines.append(f"| teacher (SFT) | {100 * teacher['accuracy']:.1f} | | " +
                 " | ".join(f"{100 * teacher['per_type'][t]['accuracy']:.0f}" for t in types) + " |")
    for arm, runs in results.items():
        accuracies = [100 * r["accuracy"] for r in runs]
        mean, std = mean_std(accuracies)
        per_type = [statistics.mean(100 * r["per_type"][t]["accuracy"] for r in runs) for t in types]
        lines.append(f"| {LABELS[arm]} | {mean:.1f} +- {std:.1f} | {', '.join(f'{a:.1f}' for a in accuracies)} | "
                     + " | ".join(f"{v:.0f}" for v in per_type) + " |")
    if paired:
        lines += ["", f"Paired differences in points: per seed, the arm's accuracy minus the reference's on that "
                  f"seed; their mean over the {len(seeds)} seeds with a {100 * CONFIDENCE:.0f}% t interval "
                  f"(n - 1 degrees of freedom); won: seeds on which the arm scored higher; higher / lower: "
                  f"the interval excludes 0; not resolved: it does not.", "",
                  "| model | " + " | ".join(f"vs {LABELS[ref]}" for ref in paired) + " |",
                  "|" + "---|" * (1 + len(paired))]
        for arm in results:
            cells = ["" if arm == ref else format_difference(paired[ref][arm]) for ref in paired]
            lines.append(f"| {LABELS[arm]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict, teacher: dict, paired: dict, run_dirs: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bars, gains, losses) = plt.subplots(1, 3, figsize=(17, 4.5))
    arms = list(results)
    colors = ["#999999" if a == "sft" else "#d62728" if a == "switchkd" else "#1f77b4" for a in arms]
    accuracies = [[100 * r["accuracy"] for r in results[a]] for a in arms]
    bars.bar(range(len(arms)), [statistics.mean(a) for a in accuracies], color=colors, alpha=0.6)
    for x, values in enumerate(accuracies):  # one dot per seed
        bars.scatter([x] * len(values), values, color="black", s=12, zorder=3)
    bars.axhline(100 * teacher["accuracy"], color="black", linestyle="--", label="teacher")
    bars.set_xticks(range(len(arms)), [LABELS[a] for a in arms], rotation=30)
    bars.set_ylabel("eval accuracy (%)")
    bars.set_title("Demo student: mean over seeds, one dot per seed")
    bars.legend()
    if "sft" in paired:
        others = [a for a in arms if a != "sft"]
        rows = [paired["sft"][a] for a in others]
        means = [r["mean"] for r in rows]
        errors = [[m - (r["interval"] or [m, m])[0] for m, r in zip(means, rows)],
                  [(r["interval"] or [m, m])[1] - m for m, r in zip(means, rows)]]
        gains.errorbar(range(len(others)), means, yerr=errors, fmt="o", capsize=4, color="black")
        gains.axhline(0, color="#999999")
        gains.set_xlim(-0.5, len(others) - 0.5)
        gains.set_xticks(range(len(others)), [LABELS[a] for a in others], rotation=30)
        gains.set_ylabel("accuracy minus SFT's, same seed (points)")
        gains.set_title(f"Paired difference vs SFT, mean and {100 * CONFIDENCE:.0f}% t interval")
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


# ---------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    """The options, with args.seeds resolved to the list of seeds: --seed-list as given, else --seeds N
    seeds from --first-seed (by default 5 from 0: seeds 0..4)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=None, help="how many seeds (default 5), from --first-seed")
    parser.add_argument("--first-seed", type=int, default=None, help="the first of the --seeds seeds (default 0)")
    parser.add_argument("--seed-list", type=int, nargs="+", default=None, metavar="S",
                        help="these seeds instead of --seeds / --first-seed")
    # Sized for a 2-core CPU: a teacher trained ~7x longer than each student run.
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps of each student run")
    parser.add_argument("--teacher-steps", type=int, default=3000, help="optimizer steps of the teacher's SFT")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--teacher-init", default="demo/models/teacher_init", help="teacher before its SFT")
    parser.add_argument("--student-init", default="demo/models/student_init", help="the one student initialisation")
    add_set_argument(parser, help_suffix="; applied to every run")
    parser.add_argument("--out", default=os.path.join(REPO_ROOT, "runs", "ablation"))
    args = parser.parse_args(argv)
    if args.seed_list is not None:
        if args.seeds is not None or args.first_seed is not None:
            parser.error("--seed-list names the seeds itself; drop --seeds / --first-seed")
        if len(set(args.seed_list)) != len(args.seed_list):
            parser.error(f"--seed-list {args.seed_list} repeats a seed")
        args.seeds = args.seed_list
    else:
        count = 5 if args.seeds is None else args.seeds
        if count < 1:
            parser.error(f"--seeds must be >= 1, got {count}")
        first = args.first_seed or 0
        args.seeds = list(range(first, first + count))
    if min(args.seeds) < 0:
        parser.error(f"seeds must be >= 0, got {args.seeds}")
    args.arms = list(dict.fromkeys(args.arms))
    return args


def check_same_eval_split(teacher: dict, results: dict, run_dirs: dict) -> None:
    """Every run must have been scored on the same questions: a run reused from an older demo (another
    eval split) would be compared with numbers it was never measured against."""
    for arm, runs in results.items():
        for run_dir, report in zip(run_dirs[arm], runs):
            if report["n"] != teacher["n"]:
                raise SystemExit(f"{run_dir} was evaluated on {report['n']} questions, the teacher on "
                                 f"{teacher['n']}: runs from another eval split; remove them or choose another --out")


def main(argv=None) -> int:
    args = parse_args(argv)
    seeds, arms = args.seeds, args.arms
    os.makedirs(args.out, exist_ok=True)
    log = os.path.join(args.out, "train.log")
    configs = os.path.join(REPO_ROOT, "recipe", "configs")
    started = time.time()

    teacher_dir = os.path.join(args.out, "teacher")
    settings = {"student.path": args.teacher_init, "max_steps": args.teacher_steps}
    train(os.path.join(configs, "demo_teacher.yaml"), teacher_dir, settings, args.overrides, log, "teacher", started)
    teacher = accuracy(teacher_dir)

    results, run_dirs = {}, {}
    for seed in seeds:  # seed by seed: an interrupted experiment leaves complete pairs
        for arm in arms:
            run_dir = os.path.join(args.out, arm, f"seed{seed}")
            settings = {"seed": seed, "student.path": args.student_init, "max_steps": args.steps,
                        "teacher.path": os.path.join(teacher_dir, "final"), **ARMS[arm]}
            train(os.path.join(configs, "demo_switchkd.yaml"), run_dir, settings, args.overrides, log,
                  f"{arm}/seed{seed}", started)
            results.setdefault(arm, []).append(accuracy(run_dir))
            run_dirs.setdefault(arm, []).append(run_dir)
    check_same_eval_split(teacher, results, run_dirs)

    scores = {arm: [r["accuracy"] for r in runs] for arm, runs in results.items()}
    paired = comparisons(scores)
    table = markdown_table(results, teacher, seeds, paired)
    print("\n" + table + "\n", flush=True)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table + "\n")
    summary = {"teacher": teacher["accuracy"], "eval_questions": teacher["n"], "seeds": seeds,
               "steps": args.steps, "teacher_steps": args.teacher_steps, "elapsed_s": time.time() - started,
               "arms": scores, "paired": paired,
               "paired_method": f"per seed arm minus reference in points; mean over seeds with a "
                                f"{100 * CONFIDENCE:.0f}% t interval, n - 1 degrees of freedom"}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(summary, f, indent=1)
    plot(results, teacher, paired, run_dirs, os.path.join(args.out, "ablation.png"))
    curves = plot_runs([dirs[0] for dirs in run_dirs.values()], os.path.join(args.out, "curves.png"))  # first seeds
    print(f"[ablation] wrote {args.out}/table.md, results.json, ablation.png, {curves} in {time.time() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
