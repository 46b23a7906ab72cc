"""What a run reports, written by rank 0: metrics.jsonl (one record per logged optimizer step and per
evaluation), the same records as TensorBoard scalars and, opted in, on Weights & Biases (report_to);
and skipped.jsonl (the samples the run could not read or encode)."""
from __future__ import annotations

import json
import math
import os
import uuid

from recipe.distributed import rank
from recipe.files import write_atomically

TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_run_id"


class JsonlLog:
    """A JSONL file of records that each carry a "step", appended by rank 0. On resume, lines past the
    checkpoint's step are dropped (they will be produced again), so an interrupted-and-resumed run ends
    with the same file as an uninterrupted one."""

    def __init__(self, path: str, resume_step: int):
        self.path = path
        self.enabled = rank() == 0
        if self.enabled and os.path.exists(path):
            with open(path) as f:
                kept = [line for line in f if _step_of(line) <= resume_step]
            write_atomically(path, "".join(kept).encode())  # a crash here must not lose the kept lines

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


class MetricsLog(JsonlLog):
    """metrics.jsonl, and every record also to the reporters named in report_to (rank 0 only)."""

    def __init__(self, path: str, resume_step: int, report_to: list[str] = (), run_config: dict | None = None):
        super().__init__(path, resume_step)
        self.eval_steps = set()  # steps with an evaluation record in the file (rank 0)
        if self.enabled and os.path.exists(path):
            with open(path) as f:
                self.eval_steps = {r["step"] for r in map(json.loads, f) if "eval" in r}
        output_dir = os.path.dirname(os.path.abspath(path))
        self.reporters = []
        if self.enabled and "tensorboard" in report_to:
            self.reporters.append(TensorBoardReporter(os.path.join(output_dir, TENSORBOARD_DIR), resume_step))
        if self.enabled and "wandb" in report_to:
            self.reporters.append(WandbReporter(output_dir, run_config or {}))

    def write(self, record: dict) -> None:
        super().write(record)
        if "eval" in record:
            self.eval_steps.add(record["step"])
        for reporter in self.reporters:
            reporter.log(scalars(record), record["step"])

    def has_eval(self, step: int) -> bool:
        return step in self.eval_steps

    def close(self) -> None:
        for reporter in self.reporters:
            reporter.close()
        self.reporters = []


def scalars(record: dict) -> dict[str, float]:
    """The numbers of a record as reporter tags: a training record's top-level numbers under "train/"
    ("train/loss", "train/lr", ...), an evaluation record's nested ones by path ("eval/accuracy",
    "eval/per_type/color/accuracy"). Strings and lists (a bad step's reason and sample ids) stay in
    metrics.jsonl only."""
    out = {}

    def add(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                add(f"{prefix}/{key}", inner)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[prefix] = float(value)

    for key, value in record.items():
        if key != "step":
            add(key if isinstance(value, dict) else f"train/{key}", value)
    return out


class TensorBoardReporter:
    """Event files under output_dir/tensorboard. On resume, TensorBoard discards the previous sessions'
    events from the resumed step on (purge_step), so the curves hold each step once."""

    def __init__(self, log_dir: str, resume_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir, purge_step=resume_step + 1 if resume_step else None)

    def log(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()  # live: a step takes seconds, a flush microseconds

    def close(self) -> None:
        self.writer.close()


class WandbReporter:
    """One W&B run per output_dir: its id is kept in output_dir/wandb_run_id, so a resumed run continues
    the same W&B run (W&B ignores steps it already holds). Its settings come from W&B's own environment
    variables: WANDB_PROJECT (default "switchkd"), WANDB_ENTITY, WANDB_MODE=offline (no network; sync
    later with `wandb sync output_dir/wandb/offline-run-*`), WANDB_API_KEY."""

    def __init__(self, output_dir: str, run_config: dict):
        import wandb

        id_file = os.path.join(output_dir, WANDB_ID_FILE)
        if os.path.isfile(id_file):
            with open(id_file) as f:
                run_id = f.read().strip()
        else:
            run_id = uuid.uuid4().hex[:16]  # W&B run ids: letters and digits
            write_atomically(id_file, run_id.encode())
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "switchkd"), id=run_id, resume="allow",
                              name=os.path.basename(output_dir), dir=output_dir, config=run_config)

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


def _step_of(line: str) -> float:
    """The step of a metrics line; a blank or torn one (a crash mid-write) sorts after every step."""
    try:
        return json.loads(line).get("step", 0)
    except json.JSONDecodeError:
        return math.inf
