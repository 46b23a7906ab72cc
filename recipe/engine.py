"""What the DeepSpeed engine is built from: its config (from the recipe config), ZeRO-3 partitioned loading,
the optimizer's parameter groups and the LR schedule."""
from __future__ import annotations

import contextlib
import json
import math
import os

import torch

from recipe import REPO_ROOT
from recipe.config import ConfigError


def deepspeed_config(cfg, precision: str, *, load_universal: bool = False) -> dict:
    """ds_configs/zero{stage}.json (or cfg.ds_config) with every "auto" filled from the recipe config.
    load_universal: the run resumes from a universal checkpoint (another number of ranks, recipe/resume.py)."""
    path = cfg.ds_config or os.path.join(REPO_ROOT, "ds_configs", f"zero{cfg.zero_stage}.json")
    with open(path) as f:
        ds = json.load(f)
    stage = ds.get("zero_optimization", {}).get("stage")
    if stage != cfg.zero_stage:
        raise ConfigError(f"{path} sets ZeRO stage {stage} but the config asks for zero_stage={cfg.zero_stage}")
    if "scheduler" in ds:
        raise ConfigError(f"{path} has a scheduler section; the recipe sets the LR schedule itself (optim.*)")
    # The loop counts micro-batches, steps and checkpoints from the recipe config, so DeepSpeed must use the
    # same values: "auto" is filled in, anything else must agree.
    _fill(ds, {"train_micro_batch_size_per_gpu": ("micro_batch_size", cfg.micro_batch_size),
               "gradient_accumulation_steps": ("grad_accum", cfg.grad_accum),
               "gradient_clipping": ("grad_clip", cfg.grad_clip)}, path, "")
    ds.setdefault("bf16", {})["enabled"] = precision == "bf16"
    ds.setdefault("fp16", {})["enabled"] = precision == "fp16"
    params = ds.setdefault("optimizer", {"type": "AdamW"}).setdefault("params", {})
    _fill(params, {"lr": ("optim.lr", cfg.optim.lr), "betas": ("optim.betas", cfg.optim.betas),
                   "eps": ("optim.eps", cfg.optim.eps), "weight_decay": ("optim.weight_decay", cfg.optim.weight_decay)},
          path, "optimizer.params.")
    zero = ds.get("zero_optimization", {})
    if zero.get("zero_hpz_partition_size") == "auto":  # ZeRO++ hpZ: a secondary parameter copy inside each node
        zero["zero_hpz_partition_size"] = ranks_per_node()
    _check_hpz(zero.get("zero_hpz_partition_size", 1), path)
    if load_universal:
        ds.setdefault("checkpoint", {})["load_universal"] = True
    if cfg.log_comms:  # every collective of deepspeed.comm, read back each step by recipe.comms.CommsMeter
        ds["comms_logger"] = {"enabled": True, "prof_all": True, "verbose": False, "debug": False}
    return ds


def ranks_per_node() -> int:
    """GPUs (ranks) of this node, as torchrun, the deepspeed launcher and launch/ set it."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", 1))


def _check_hpz(size, path: str) -> None:
    from recipe.distributed import world_size

    if not isinstance(size, int) or size < 1 or world_size() % size:
        raise ConfigError(f"{path}: zero_hpz_partition_size={size!r} must be a positive integer that divides the "
                          f"number of ranks ({world_size()}); \"auto\" is the ranks of one node")


def _fill(section: dict, values: dict, path: str, prefix: str) -> None:
    for key, (recipe_key, value) in values.items():
        given = section.get(key, "auto")
        if given == "auto":
            section[key] = value
        elif given != value:
            raise ConfigError(f"{path} sets {prefix}{key}={given!r} but the recipe config has {recipe_key}={value!r}; "
                              f"set it to \"auto\" there or make the two agree")


def zero3_loading(ds_config: dict):
    """While the returned object lives, transformers' from_pretrained creates each parameter partitioned
    across the ranks (deepspeed.zero.Init); None unless ds_config is ZeRO-3."""
    if ds_config.get("zero_optimization", {}).get("stage") != 3:
        return None
    try:
        import accelerate  # noqa: F401  transformers' partitioned loading requires it
    except ImportError as e:
        raise ConfigError("zero_stage 3 loads the models partitioned through transformers, which needs the "
                          "accelerate package: pip install -r requirements.txt") from e
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(ds_config)


def before_partitioned_load() -> None:
    """DeepSpeed 0.19.8's zero.Init creates ZeRO++'s node-level process group (hpZ, zero_hpz_partition_size
    > 1) every time it runs and asserts that none exists yet, so the second partitioned load of a run (the
    student after the teacher) would fail. Forgetting the previous one's group lets the next load create its
    own: the parameters already loaded keep the group they were partitioned with, the engine uses the last."""
    from deepspeed.utils import groups

    groups._ZERO_PARAM_INTRA_PARALLEL_GROUP = None


@contextlib.contextmanager
def whole_loading(zero3):
    """Inside, from_pretrained loads whole models even while ZeRO-3's partitioned loading (zero3_loading)
    is alive: for a teacher held outside ZeRO (teacher_placement: replicated)."""
    if zero3 is None:
        yield
        return
    from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(zero3)


def parameter_counts(module: torch.nn.Module | None) -> tuple[int, int]:
    """(parameters of the whole model, parameters this rank holds): equal unless ZeRO-3 partitioned them.
    A partitioned parameter is an empty tensor between uses; ds_numel is its size, ds_tensor this rank's part."""
    if module is None:
        return 0, 0
    params = list(module.parameters())
    held = sum(p.ds_tensor.numel() if p.numel() == 0 and hasattr(p, "ds_tensor") else p.numel() for p in params)
    return sum(getattr(p, "ds_numel", p.numel()) for p in params), held


def param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only; biases and norm scales are left alone. Frozen parameters excluded.
    A parameter partitioned at load (ZeRO-3) is an empty tensor here: its shape is in ds_shape."""
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(optimizer, *, warmup_steps: int, max_steps: int, min_lr_ratio: float):
    """Linear warmup to the peak LR, then cosine down to peak * min_lr_ratio at max_steps."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
