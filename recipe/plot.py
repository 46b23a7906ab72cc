"""Training curves of one or more runs, side by side in one PNG (from each run's metrics.jsonl).

    python -m recipe.plot RUN_DIR [RUN_DIR ...] [--out PNG]

Panels: the loss terms (ce, align, vsd), the learning rate, the gradient norm, tokens/s and the eval
accuracy (evaluation records: every eval_every steps and at the end). One line per run, labelled by its
directory. Default output: RUN_DIR/curves.png for one run, curves.png in the runs' common parent
directory for several. Prints the path it wrote.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

PANELS = (("ce", "CE"), ("align", "alignment D(z_T, z_S)"), ("vsd", "VSD D(z_T, z_SW)"),
          ("lr", "learning rate"), ("grad_norm", "gradient norm"), ("tokens_per_s", "tokens/s"))


def read_records(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: {run_dir} is not a run directory (output_dir of recipe.train)")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of a training-record key; None and non-finite values (skipped steps) left out."""
    points = [(r["step"], r[key]) for r in records
              if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [s for s, _ in points], [v for _, v in points]


def eval_series(records: list[dict]) -> tuple[list[int], list[float]]:
    points = [(r["step"], 100 * r["eval"]["accuracy"]) for r in records if "eval" in r]
    return [s for s, _ in points], [v for _, v in points]


def default_output(run_dirs: list[str]) -> str:
    if len(run_dirs) == 1:
        return os.path.join(run_dirs[0], "curves.png")
    return os.path.join(os.path.commonpath([os.path.abspath(d) for d in run_dirs]), "curves.png")


def plot_runs(run_dirs: list[str], out: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {_label(d, run_dirs): read_records(d) for d in run_dirs}
    fig, axes = plt.subplots(2, 4, figsize=(18, 7.5))
    panels = [*PANELS, (None, "eval accuracy (%)")]
    for ax, (key, title) in zip(axes.flat, panels):
        for label, records in runs.items():
            steps, values = series(records, key) if key else eval_series(records)
            ax.plot(steps, values, marker="o" if key is None or len(steps) < 3 else None, markersize=4, label=label)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        if key in ("lr", "grad_norm") and any(series(r, key)[1] for r in runs.values()):
            ax.set_yscale("log")
    legend = axes.flat[-1]  # the eighth panel: the runs
    legend.axis("off")
    legend.legend(*axes.flat[0].get_legend_handles_labels(), loc="center", fontsize="small")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _label(run_dir: str, run_dirs: list[str]) -> str:
    """The run's directory, relative to the runs' common parent when there are several."""
    if len(run_dirs) == 1:
        return os.path.basename(os.path.abspath(run_dir))
    return os.path.relpath(os.path.abspath(run_dir), os.path.dirname(default_output(run_dirs)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="output_dir of a training run")
    parser.add_argument("--out", help="PNG to write (default: see above)")
    args = parser.parse_args(argv)
    try:
        out = plot_runs(args.run_dirs, args.out or default_output(args.run_dirs))
    except (FileNotFoundError, json.JSONDecodeError) as e:
        sys.exit(f"plot: {e}")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
