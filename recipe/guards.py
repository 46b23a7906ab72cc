"""What keeps a long run from going wrong silently: bad data met during training (skipped, reported,
and stopped above a fraction of an epoch) and diverging steps (skipped; stopped after max_bad_steps in
a row, or at once when the weights themselves are no longer finite).

Every decision here is taken from values already reduced over the ranks, so every rank takes it at
the same step: no rank is left waiting in a collective for one that stopped.
"""
from __future__ import annotations

import math
from collections import Counter

import torch

from recipe.distributed import rank
from recipe.metrics import JsonlLog


class RunStopped(SystemExit):
    """The run cannot usefully continue: the process exits non-zero with the message (printed by rank 0;
    every rank raises it at the same step), which says why and what to do."""

    def __init__(self, message: str):
        super().__init__(f"[train] stopped: {message}" if rank() == 0 else 1)


class SkippedSamples:
    """Samples left out as unreadable or unencodable: one line each in skipped.jsonl, a count per epoch
    (checkpointed, so a resumed run counts the same), and a stop when an epoch's count exceeds
    max_fraction of the epoch."""

    def __init__(self, log: JsonlLog, epoch_size: int, max_fraction: float, state: dict | None = None):
        self.log, self.epoch_size, self.max_fraction = log, epoch_size, max_fraction
        state = state or {}
        self.epoch = state.get("epoch", 0)
        self.by_shard = Counter(state.get("by_shard", {}))
        self.reasons = Counter(state.get("reasons", {}))

    def add(self, records: list[dict], step: int, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.by_shard, self.reasons = epoch, Counter(), Counter()
        for record in records:
            self.log.write({"step": step, "epoch": epoch, **record})
            self.by_shard[record.get("shard")] += 1
            self.reasons[record["reason"].split(":")[0]] += 1
        count = sum(self.by_shard.values())
        if records and count > self.max_fraction * self.epoch_size:
            shards = ", ".join(f"{shard} ({n})" for shard, n in self.by_shard.most_common(3))
            reasons = ", ".join(f"{reason} ({n})" for reason, n in self.reasons.most_common(3))
            raise RunStopped(
                f"{count} of the {self.epoch_size} samples of epoch {epoch} could not be read or encoded so far, "
                f"more than data.max_skipped_fraction={self.max_fraction}; by shard: {shards}; reasons: {reasons}, "
                f"the last: {records[-1]['reason']}. "
                f"Check or reconvert those shards (every skipped sample is listed in {self.log.path}), then rerun "
                f"the same command to resume from the last checkpoint")

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "by_shard": dict(self.by_shard), "reasons": dict(self.reasons)}


class BadSteps:
    """Optimizer steps skipped for a non-finite loss or gradient norm, counted while they come in a row."""

    def __init__(self, max_in_a_row: int, state: dict | None = None):
        self.max_in_a_row = max_in_a_row
        self.in_a_row = (state or {}).get("in_a_row", 0)

    def update(self, step: int, bad: bool, last_checkpoint: str | None) -> None:
        self.in_a_row = self.in_a_row + 1 if bad else 0
        if self.in_a_row >= self.max_in_a_row:
            raise RunStopped(
                f"steps {step - self.in_a_row + 1}-{step}: {self.in_a_row} optimizer steps in a row had a non-finite "
                f"loss or gradient norm (each was skipped: no update; max_bad_steps={self.max_in_a_row}); the run "
                f"diverged. {_checkpoint_note(last_checkpoint)} Lower optim.lr or look at the samples of those steps "
                f"(bad_step_samples in metrics.jsonl)")

    def state_dict(self) -> dict:
        return {"in_a_row": self.in_a_row}


def check_weights(weights_finite: bool, step: int, last_checkpoint: str | None) -> None:
    if not weights_finite:
        raise RunStopped(f"step {step}: the student's weights are no longer finite (inf or NaN); stopping without "
                         f"saving them. {_checkpoint_note(last_checkpoint)} Lower optim.lr")


def _checkpoint_note(last_checkpoint: str | None) -> str:
    if last_checkpoint is None:
        return "No checkpoint was saved yet."
    return f"The last checkpoint, {last_checkpoint}, holds finite weights from before."


def bad_step_reason(terms: dict[str, float], step_applied: bool, fp16: bool) -> str | None:
    """Why this step counts as bad, None when it does not. A non-finite loss always does; so does a step
    DeepSpeed skipped for its non-finite gradient norm, except under fp16, where that is the loss scaler
    finding its scale (DeepSpeed lowers it and goes on)."""
    bad_terms = [key for key, value in terms.items() if not math.isfinite(value)]
    if bad_terms:
        return f"non-finite {', '.join(bad_terms)}"
    if not step_applied and not fp16:
        return "non-finite gradient norm"
    return None


def backward_source(loss: torch.Tensor) -> torch.Tensor:
    """The tensor to backpropagate. DeepSpeed (ZeRO-2 and ZeRO-3) skips the optimizer update and the LR
    step, on every rank, when the global gradient norm is not finite; a non-finite loss can still leave
    finite gradients (an inf constant term), so its gradients are made NaN to be skipped the same way.
    The same value as loss, times a constant 1 (or NaN), without a device sync."""
    scale = torch.where(torch.isfinite(loss.detach()), 1.0, float("nan")).to(loss.dtype)
    return loss * scale


def weights_finite(module: torch.nn.Module) -> bool:
    """Whether this rank's share of the trainable weights is finite (ZeRO-3: its partitions, ds_tensor)."""
    tensors = [getattr(p, "ds_tensor", p) for p in module.parameters() if p.requires_grad]
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()) if tensors else True
