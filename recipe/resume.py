"""Resuming a run from its newest checkpoint, on the same or on another number of ranks (docs/scaling.md).

Each checkpoint records what a resume needs before anything is loaded (run_state.json: the step, the
sampler position, the number of ranks, micro_batch_size, grad_accum, the global batch and the ZeRO stage).
On another number of ranks:
- the global batch is kept: grad_accum is recomputed so that micro_batch_size x grad_accum x ranks stays
  equal; a number of ranks (or a micro_batch_size) that cannot keep it stops before any model is loaded;
- the data continues the epoch's global order at the sample where it stopped, cut into the same
  micro-batches (recipe/data/sampler.py);
- DeepSpeed's per-rank ZeRO partitions, which only load on the number of ranks that wrote them, are
  converted once into its universal checkpoint (one folder per parameter holding the fp32 weights, the Adam
  moments and the step, written into the checkpoint's `universal/` folder); DeepSpeed then cuts each rank's
  new partition out of it ("checkpoint": {"load_universal": true}). The LR schedule travels with the model
  states. The frozen teacher is never in a checkpoint: it is loaded from teacher.path on every start.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import re
import shutil
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

from recipe.checkpoints import RUN_STATE, UNIVERSAL
from recipe.config import ConfigError
from recipe.distributed import rank


def run_state(cfg, step: int, sampler_state: dict, world: int) -> dict:
    """The client state of a checkpoint: the loop's position and the batch layout it was trained with."""
    return {"step": step, "sampler": sampler_state, "world_size": world, "micro_batch_size": cfg.micro_batch_size,
            "grad_accum": cfg.grad_accum, "global_batch": cfg.micro_batch_size * cfg.grad_accum * world,
            "zero_stage": cfg.zero_stage}


def saved_run_state(checkpoint_dir: str, tag: str) -> dict | None:
    """run_state.json of a checkpoint; None for a checkpoint written before it existed."""
    try:
        with open(os.path.join(checkpoint_dir, tag, RUN_STATE)) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def saved_world_size(checkpoint_dir: str, tag: str) -> int:
    """Ranks that wrote a checkpoint, from its ZeRO partition files (one per data-parallel rank)."""
    files = glob.glob(os.path.join(checkpoint_dir, tag, "*zero_pp_rank_*_optim_states.pt"))
    ranks = {int(re.search(r"zero_pp_rank_(\d+)_", os.path.basename(f)).group(1)) for f in files}
    if not ranks:
        raise ConfigError(f"{checkpoint_dir}/{tag} has no ZeRO optimizer partitions (*_optim_states.pt); "
                          f"it is not a complete checkpoint of this recipe")
    return len(ranks)


def grad_accum_keeping(global_batch: int, micro_batch_size: int, world: int) -> int:
    """grad_accum that keeps `global_batch` samples per optimizer step on `world` ranks; ConfigError if none."""
    per_micro_step = micro_batch_size * world
    if global_batch % per_micro_step == 0:
        return global_batch // per_micro_step
    ranks = [w for w in range(1, global_batch + 1) if global_batch % (micro_batch_size * w) == 0]
    micros = [m for m in range(1, global_batch + 1) if global_batch % (m * world) == 0]
    ways = [f"resume on one of {ranks} ranks" if ranks else
            f"no number of ranks keeps it with micro_batch_size={micro_batch_size}"]
    if micros:
        ways.append(f"set micro_batch_size to one of {micros}")
    advice = "; ".join(ways)
    raise ConfigError(
        f"the checkpoint was trained with a global batch of {global_batch} samples per optimizer step, which "
        f"{world} ranks with micro_batch_size={micro_batch_size} cannot keep ({global_batch} is not a multiple of "
        f"{micro_batch_size} x {world}). {advice[0].upper()}{advice[1:]} (grad_accum is recomputed to keep the "
        f"global batch)")


@dataclass
class ResumePlan:
    tag: str
    config: object  # the run's config with grad_accum recomputed to keep the global batch
    saved_world: int
    world: int
    saved_grad_accum: int
    saved_micro_batch_size: int

    @property
    def universal(self) -> bool:
        """ZeRO partitions written on another number of ranks: load through DeepSpeed's universal checkpoint."""
        return self.saved_world != self.world

    def startup_line(self) -> str | None:
        """What changed and how the global batch is kept; None when nothing did."""
        cfg = self.config
        batch = cfg.micro_batch_size * cfg.grad_accum * self.world
        now = f"micro_batch_size {cfg.micro_batch_size} x grad_accum {cfg.grad_accum} x {self.world} ranks"
        was = f"{self.saved_micro_batch_size} x {self.saved_grad_accum} x {self.saved_world}"
        if self.universal:
            return (f"world size changed: {self.tag} was written on {self.saved_world} ranks, resuming on "
                    f"{self.world}; the global batch of {batch} samples per step is kept as {now} (was {was}); "
                    f"weights, optimizer state and LR schedule load from its universal checkpoint")
        if (cfg.micro_batch_size, cfg.grad_accum) != (self.saved_micro_batch_size, self.saved_grad_accum):
            return f"the global batch of {batch} samples per step is kept as {now} (was {was})"
        return None


def plan_resume(cfg, checkpoint_dir: str, tag: str, world: int) -> ResumePlan:
    """How to continue checkpoint `tag` on `world` ranks with this config; ConfigError when it cannot."""
    state = saved_run_state(checkpoint_dir, tag)
    saved_world = saved_world_size(checkpoint_dir, tag)
    if state is None:  # written before run_state.json: assume the config it was written with is unchanged
        state = {"world_size": saved_world, "micro_batch_size": cfg.micro_batch_size, "grad_accum": cfg.grad_accum,
                 "global_batch": cfg.micro_batch_size * cfg.grad_accum * saved_world, "zero_stage": cfg.zero_stage}
    if state["world_size"] != saved_world:
        raise ConfigError(f"{checkpoint_dir}/{tag}: {RUN_STATE} says {state['world_size']} ranks but it holds "
                          f"ZeRO partitions of {saved_world}; the checkpoint is damaged")
    if state["zero_stage"] != cfg.zero_stage:
        raise ConfigError(f"{checkpoint_dir}/{tag} was written at ZeRO-{state['zero_stage']} but the config asks for "
                          f"zero_stage={cfg.zero_stage}; resume with zero_stage: {state['zero_stage']}")
    grad_accum = grad_accum_keeping(state["global_batch"], cfg.micro_batch_size, world)
    return ResumePlan(tag=tag, config=dataclasses.replace(cfg, grad_accum=grad_accum), saved_world=saved_world,
                      world=world, saved_grad_accum=state["grad_accum"],
                      saved_micro_batch_size=state["micro_batch_size"])


def prepare_universal(checkpoint_dir: str, tag: str) -> None:
    """The universal checkpoint of `tag` (its `universal/` folder), converted once by rank 0 while the
    others wait."""
    folder = os.path.join(checkpoint_dir, tag)
    # A wait of its own: the conversion reads and writes every optimizer state, which can outlast the
    # default process group's timeout (DeepSpeed: 10 minutes).
    waiting = dist.new_group(backend="gloo", timeout=timedelta(hours=2)) if dist.is_initialized() else None
    if rank() == 0 and not os.path.isdir(os.path.join(folder, UNIVERSAL)):
        convert_to_universal(folder)
    if waiting is not None:
        dist.barrier(group=waiting)
        dist.destroy_process_group(waiting)


def convert_to_universal(folder: str) -> None:
    """DeepSpeed's ds_to_universal of one checkpoint folder into folder/universal (atomically: a partial
    conversion is left under another name and redone on the next start)."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    target, partial = os.path.join(folder, UNIVERSAL), os.path.join(folder, UNIVERSAL + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    workers = max(1, min(4, len(os.sched_getaffinity(0)) // 2))  # 1: in-process (small machines, tests)
    print(f"[train] converting {folder} to a universal checkpoint for the new number of ranks", flush=True)
    # inject_missing_state: the recipe's models carry no Megatron-style universal_checkpoint_info; plain
    # data parallelism needs none (no tensor or pipeline slices to merge).
    ds_to_universal(argparse.Namespace(input_folder=folder, output_folder=partial, num_extract_workers=workers,
                                       num_merge_workers=workers, keep_temp_folder=False, strict=True,
                                       inject_missing_state=True))
    os.remove(os.path.join(folder, "latest_universal"))  # ds_to_universal's pointer to `partial`; unused
    os.rename(partial, target)
