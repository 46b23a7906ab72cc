"""Checkpoints of a run (DeepSpeed's, without the frozen teacher, plus RNG states) and the final export.

Layout: checkpoint_dir/stepNNNNNNNN/ (one per saved step) and checkpoint_dir/latest (the tag to resume
from). Crash safety: a checkpoint is written into stepNNNNNNNN.partial/, fsynced, and renamed to
stepNNNNNNNN/ only once every rank has written its part; `latest` is replaced atomically after that, and
older checkpoints are removed last. A kill -9 at any moment therefore leaves `latest` naming a complete
checkpoint; leftovers of an interrupted save are removed by the next one.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import shutil

import numpy as np
import torch
import torch.distributed as dist

from recipe.distributed import any_rank, rank
from recipe.files import fsync_path, write_atomically

LATEST = "latest"
RUN_STATE = "run_state.json"  # the client state as JSON: what a resume reads before loading anything (recipe/resume.py)
UNIVERSAL = "universal"  # a checkpoint's DeepSpeed universal checkpoint, for another number of ranks (recipe/resume.py)
PARTIAL_SUFFIX = ".partial"
ADAM_STATE_BYTES = 12  # per trainable parameter: fp32 master copy + two moments
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "chat_template.jinja", "chat_template.json")


def latest_tag(checkpoint_dir: str) -> str | None:
    """The newest complete checkpoint: `latest` is written only after every rank has saved."""
    path = os.path.join(checkpoint_dir, LATEST)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        tag = f.read().strip()
    return tag if os.path.isdir(os.path.join(checkpoint_dir, tag)) else None


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (a full disk...); the previous one is untouched."""


def save_checkpoint(engine, checkpoint_dir: str, step: int, client_state: dict, keep: int) -> str:
    """Every rank calls this. Returns the tag; raises CheckpointError, before writing anything when the
    disk has too little space for it, and with the partial write removed when writing fails."""
    tag = f"step{step:08d}"
    partial = tag + PARTIAL_SUFFIX
    os.makedirs(checkpoint_dir, exist_ok=True)
    node_main = int(os.environ.get("LOCAL_RANK", 0)) == 0  # checks the space, fsyncs the node's writes
    needed = checkpoint_bytes(engine, checkpoint_dir) if node_main else 0
    free = shutil.disk_usage(checkpoint_dir).free
    if any_rank(free < needed, engine.device):
        raise CheckpointError(_space_message(checkpoint_dir, tag, needed, free, "not enough space"))
    if rank() == 0:
        for name in os.listdir(checkpoint_dir):  # an interrupted save's leftovers (any step)
            if name.endswith(PARTIAL_SUFFIX):
                shutil.rmtree(os.path.join(checkpoint_dir, name), ignore_errors=True)
    _barrier()
    try:
        # The frozen teacher is loaded from teacher.path on every start; it is not part of the checkpoint.
        engine.save_checkpoint(checkpoint_dir, tag=partial, client_state=client_state, save_latest=False,
                               exclude_frozen_parameters=True)
        torch.save(rng_state(), os.path.join(checkpoint_dir, partial, f"rng_rank{rank():05d}.pt"))
        if rank() == 0:  # what a resume reads before loading anything (recipe/resume.py)
            write_atomically(os.path.join(checkpoint_dir, partial, RUN_STATE),
                             json.dumps(client_state, indent=1).encode())
        _barrier()
        if node_main:  # one flush per node of what its ranks wrote
            for root, dirs, names in os.walk(os.path.join(checkpoint_dir, partial)):
                for name in names + dirs:
                    fsync_path(os.path.join(root, name))
        _barrier()
        if rank() == 0:
            complete = os.path.join(checkpoint_dir, tag)
            if os.path.isdir(complete):  # the same step saved before a crash, not yet named by `latest`
                shutil.rmtree(complete)
            os.rename(os.path.join(checkpoint_dir, partial), complete)
            fsync_path(checkpoint_dir)
            write_atomically(os.path.join(checkpoint_dir, LATEST), tag.encode())
            fsync_path(checkpoint_dir)
    except Exception as e:  # a full disk shows as OSError(ENOSPC) or as torch.save's RuntimeError
        shutil.rmtree(os.path.join(checkpoint_dir, partial), ignore_errors=True)  # frees what it took
        free, needed = shutil.disk_usage(checkpoint_dir).free, needed or checkpoint_bytes(engine, checkpoint_dir)
        raise CheckpointError(_space_message(checkpoint_dir, tag, needed, free, f"{type(e).__name__}: {e}")) from e
    if rank() == 0:
        rotate_checkpoints(checkpoint_dir, keep)
    _barrier()
    return tag


def checkpoint_bytes(engine, checkpoint_dir: str) -> int:
    """The space a new checkpoint takes: the previous one's size, or before the first save an estimate
    from the trainable parameters (their weights plus AdamW's fp32 state)."""
    previous = latest_tag(checkpoint_dir)
    if previous is not None:
        return sum(os.path.getsize(os.path.join(root, name))
                   for root, _, names in os.walk(os.path.join(checkpoint_dir, previous)) for name in names)
    trainable = [p for p in engine.module.parameters() if p.requires_grad]
    return sum(getattr(p, "ds_numel", p.numel()) * (p.element_size() + ADAM_STATE_BYTES) for p in trainable)


def _space_message(checkpoint_dir: str, tag: str, needed: int, free: int, cause: str) -> str:
    previous = latest_tag(checkpoint_dir)
    kept = (f"the previous checkpoint {checkpoint_dir}/{previous} is kept" if previous else "no checkpoint was saved")
    return (f"cannot write checkpoint {tag} to {checkpoint_dir} ({cause}): it needs about {needed / 2**20:.1f} MiB, "
            f"{free / 2**20:.1f} MiB are free; {kept}. Free some space (or lower keep_checkpoints) and rerun the "
            f"same command to resume")


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rotate_checkpoints(checkpoint_dir: str, keep: int) -> None:
    tags = sorted(t for t in os.listdir(checkpoint_dir) if t.startswith("step") and not t.endswith(PARTIAL_SUFFIX)
                  and os.path.isdir(os.path.join(checkpoint_dir, t)))
    current = latest_tag(checkpoint_dir)
    for tag in tags[:-keep]:
        if tag != current:
            shutil.rmtree(os.path.join(checkpoint_dir, tag), ignore_errors=True)


def load_checkpoint(engine, checkpoint_dir: str, tag: str, universal: bool = False) -> dict:
    """Weights, optimizer state and LR schedule into the engine; returns the client state. universal: from
    the tag's universal/ folder (recipe/resume.py; the engine was built with "load_universal"), which
    DeepSpeed repartitions for the current number of ranks."""
    load_dir, load_tag = (os.path.join(checkpoint_dir, tag), UNIVERSAL) if universal else (checkpoint_dir, tag)
    decay = [group["weight_decay"] for group in engine.optimizer.param_groups]
    _, client_state = engine.load_checkpoint(load_dir, tag=load_tag, load_module_strict=False,
                                             load_optimizer_states=True, load_lr_scheduler_states=True)
    if client_state is None:
        raise RuntimeError(f"could not load checkpoint {checkpoint_dir}/{tag}")
    if universal:
        repair_universal_load(engine, decay)
    # On another number of ranks a rank may have no RNG state of its own: it keeps its seeded one.
    rng_file = os.path.join(checkpoint_dir, tag, f"rng_rank{rank():05d}.pt")
    if os.path.isfile(rng_file):
        set_rng_state(torch.load(rng_file, weights_only=False))
    return client_state


def repair_universal_load(engine, weight_decay: list[float]) -> None:
    """Two repairs after DeepSpeed 0.19.8's ZeRO-3 universal load (harmless at ZeRO-2, which needs neither):
    it copies the first parameter group's settings to every group, so the no-decay group would get weight
    decay (ours are fixed by the config: engine.param_groups), and it gives every group's Adam state one shared
    step tensor, which each group's update then increments in place (later groups would skip steps in
    Adam's bias correction)."""
    for group, decay in zip(engine.optimizer.param_groups, weight_decay):
        group["weight_decay"] = decay
    for state in engine.optimizer.optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


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


def evaluated_step(final_dir: str) -> int | None:
    """The step whose exported student final/eval.json scores, None when there is none (or it is older
    than this field). A run extended past that step is evaluated again."""
    return (final_evaluation(final_dir) or {}).get("step")


def final_evaluation(final_dir: str) -> dict | None:
    """final/eval.json: {"step", "n", "accuracy", "per_type"}; None when there is none."""
    try:
        with open(os.path.join(final_dir, "eval.json")) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _take_multimodal_messages(out_dir: str, tokenizer) -> None:
    from recipe.data.conversation import multimodal_chat_template
    from recipe.models.loading import load_chat_template

    template = load_chat_template(out_dir) or tokenizer.chat_template
    if template and multimodal_chat_template(template) != template:
        write_atomically(os.path.join(out_dir, "chat_template.jinja"), multimodal_chat_template(template).encode())


def export_student(engine, student, out_dir: str, tokenizer, student_path: str) -> None:
    """Save the student with save_pretrained (gathering ZeRO-3 partitions) plus tokenizer and processor.

    The processor's chat template must take HF's multimodal messages (what AutoProcessor.apply_chat_template,
    lmms-eval and the image-text-to-text pipeline hand it): a text-only one is wrapped by
    recipe.data.conversation.multimodal_chat_template, which renders plain-string content unchanged."""
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
        _take_multimodal_messages(out_dir, tokenizer)
    if dist.is_initialized():
        dist.barrier()
