"""metrics.jsonl: one record per logged optimizer step (and per evaluation), written by rank 0."""
from __future__ import annotations

import json
import math
import os

from recipe.distributed import rank
from recipe.files import write_atomically


class MetricsLog:
    """metrics.jsonl on rank 0; on resume, lines past the checkpoint's step are dropped (they will be
    produced again), so an interrupted-and-resumed run ends with the same file as an uninterrupted one."""

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


def _step_of(line: str) -> float:
    """The step of a metrics line; a blank or torn one (a crash mid-write) sorts after every step."""
    try:
        return json.loads(line).get("step", 0)
    except json.JSONDecodeError:
        return math.inf
