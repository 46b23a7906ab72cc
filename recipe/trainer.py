"""Pieces of the training loop that are not the loop: distributed set-up, the DeepSpeed config, the LR
schedule, checkpoints, metrics, preemption signals and the final export. recipe/train.py uses them."""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import socket

import numpy as np
import torch
import torch.distributed as dist

from recipe.config import ConfigError
from recipe.files import write_atomically

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LATEST = "latest"
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "chat_template.jinja", "chat_template.json")


# ---------------------------------------------------------------- distributed

def ensure_distributed_env() -> None:
    """A plain `python -m recipe.train` is a world of one; launchers (torchrun, srun) set these."""
    if "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def all_reduce_mean(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.tolist()


def any_rank(flag: bool, device) -> bool:
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------- DeepSpeed config

def deepspeed_config(cfg, precision: str) -> dict:
    """ds_configs/zero{stage}.json (or cfg.ds_config) with every "auto" filled from the recipe config."""
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
    return ds


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


# ---------------------------------------------------------------- checkpoints

def latest_tag(checkpoint_dir: str) -> str | None:
    """The newest complete checkpoint: `latest` is written only after every rank has saved."""
    path = os.path.join(checkpoint_dir, LATEST)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        tag = f.read().strip()
    return tag if os.path.isdir(os.path.join(checkpoint_dir, tag)) else None


def save_checkpoint(engine, checkpoint_dir: str, step: int, client_state: dict, keep: int) -> str:
    tag = f"step{step:08d}"
    # The frozen teacher is loaded from teacher.path on every start; it is not part of the checkpoint.
    engine.save_checkpoint(checkpoint_dir, tag=tag, client_state=client_state, save_latest=False,
                           exclude_frozen_parameters=True)
    torch.save(rng_state(), os.path.join(checkpoint_dir, tag, f"rng_rank{rank():05d}.pt"))
    if dist.is_initialized():
        dist.barrier()
    if rank() == 0:
        write_atomically(os.path.join(checkpoint_dir, LATEST), tag.encode())
        rotate_checkpoints(checkpoint_dir, keep)
    if dist.is_initialized():
        dist.barrier()
    return tag


def rotate_checkpoints(checkpoint_dir: str, keep: int) -> None:
    tags = sorted(t for t in os.listdir(checkpoint_dir) if t.startswith("step") and
                  os.path.isdir(os.path.join(checkpoint_dir, t)))
    current = latest_tag(checkpoint_dir)
    for tag in tags[:-keep]:
        if tag != current:
            shutil.rmtree(os.path.join(checkpoint_dir, tag), ignore_errors=True)


def load_checkpoint(engine, checkpoint_dir: str, tag: str) -> dict:
    _, client_state = engine.load_checkpoint(checkpoint_dir, tag=tag, load_module_strict=False,
                                             load_optimizer_states=True, load_lr_scheduler_states=True)
    if client_state is None:
        raise RuntimeError(f"could not load checkpoint {checkpoint_dir}/{tag}")
    rng_file = os.path.join(checkpoint_dir, tag, f"rng_rank{rank():05d}.pt")
    if os.path.isfile(rng_file):
        set_rng_state(torch.load(rng_file, weights_only=False))
    return client_state


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---------------------------------------------------------------- metrics

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


# ---------------------------------------------------------------- preemption

class StopRequest:
    """SIGTERM / SIGUSR1 set a flag; the loop saves and exits at the next step boundary."""

    def __init__(self):
        self.signal_name = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signal_name = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        return self.signal_name is not None


# ---------------------------------------------------------------- export

def evaluated_step(final_dir: str) -> int | None:
    """The step whose exported student final/eval.json scores, None when there is none (or it is older
    than this field). A run extended past that step is evaluated again."""
    try:
        with open(os.path.join(final_dir, "eval.json")) as f:
            return json.load(f).get("step")
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def export_student(engine, student, out_dir: str, tokenizer, student_path: str) -> None:
    """Save the student with save_pretrained (gathering ZeRO-3 partitions) plus tokenizer and processor."""
    import deepspeed

    params = list(student.parameters())
    gathered = (deepspeed.zero.GatheredParameters(params, modifier_rank=None)
                if engine.zero_optimization_stage() == 3 else contextlib.nullcontext())
    with gathered:
        if rank() == 0:
            os.makedirs(out_dir, exist_ok=True)
            state = {k: v.detach().cpu().clone() for k, v in student.state_dict().items()}
            student.save_pretrained(out_dir, state_dict=state)
    if rank() == 0:
        tokenizer.save_pretrained(out_dir)
        for name in PROCESSOR_FILES:
            if os.path.isfile(os.path.join(student_path, name)):
                shutil.copy(os.path.join(student_path, name), os.path.join(out_dir, name))
    if dist.is_initialized():
        dist.barrier()
