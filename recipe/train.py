"""Switch-KD training (or plain SFT of the student when no teacher is given) on DeepSpeed ZeRO-2/3.

    python -m recipe.train --config recipe/configs/demo_switchkd.yaml [--set key=value ...]

Read top to bottom: config -> distributed -> models, data and engine -> resume -> loop (train_step) -> finish
(export and final evaluation).
Rerunning the same command resumes from the newest complete checkpoint in output_dir/checkpoints.
Any error ends every rank with a non-zero exit and no DataLoader worker left behind (MicroBatches.close).
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import signal
import sys
import time
from dataclasses import dataclass

import torch
from torch.distributed.elastic.multiprocessing.errors import record

from recipe.checkpoints import (
    evaluated_step,
    export_student,
    final_evaluation,
    latest_tag,
    load_checkpoint,
    save_checkpoint,
)
from recipe.config import ConfigError, add_set_argument, load_config, to_dict
from recipe.distributed import (
    StopRequest,
    all_gather_lists,
    all_reduce_mean,
    any_rank,
    die_with_parent,
    ensure_distributed_env,
    kill_worker_processes,
    rank,
    seed_everything,
    world_size,
)
from recipe.engine import (
    before_partitioned_load,
    deepspeed_config,
    param_groups,
    parameter_counts,
    warmup_cosine,
    whole_loading,
    zero3_loading,
)
from recipe.files import write_atomically
from recipe.guards import (
    BadSteps,
    SkippedSamples,
    backward_source,
    bad_step_reason,
    check_weights,
    weights_finite,
)
from recipe.metrics import JsonlLog, MetricsLog
from recipe.resume import plan_resume, prepare_universal, run_state

LOSS_TERMS = ("loss", "ce", "align", "vsd")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Switch-KD / SFT training on DeepSpeed")
    parser.add_argument("--config", required=True, help="YAML file (see recipe/configs/)")
    add_set_argument(parser)
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    return parser.parse_args(argv)


def auto_precision() -> str:
    """bf16 on GPUs that compute in it (Ampere and newer); fp32 elsewhere. Not fp16 on older GPUs: some
    models (Qwen2.5 among them) overflow its range; precision: fp16 asks for it, with loss scaling."""
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False):
        return "bf16"
    if torch.cuda.is_available():
        print("[train] this GPU has no bf16: training in fp32 (precision: fp16 for loss-scaled fp16)", flush=True)
    return "fp32"


def build_models(cfg, precision, zero3=None):
    """(student, teacher or None, the student's tokenizer, the shared vocabulary the divergences compare or None
    when both tables have the same size). zero3: ZeRO-3's partitioned loading (zero3_loading); a replicated
    teacher is loaded whole regardless, and placed on this rank's device by hand."""
    from recipe.models import check_pair, load_tokenizer, load_vlm

    for role in ("student", "teacher"):
        path = getattr(cfg, role).path
        if path is not None and not os.path.isfile(os.path.join(path, "config.json")):
            raise ConfigError(f"{role}.path: no model checkpoint at {path!r} (expected {path}/config.json)")
    tokenizer = load_tokenizer(cfg.student.path)
    teacher = shared_vocab = None
    if cfg.distill:
        from transformers import AutoConfig
        # Checked on configs, tokenizers and image processors before any weights are loaded.
        teacher_config, student_config = (AutoConfig.from_pretrained(p) for p in (cfg.teacher.path, cfg.student.path))
        pair = check_pair(teacher_config, student_config, load_tokenizer(cfg.teacher.path), tokenizer,
                          _image_processor_or_none(cfg.teacher.path), _image_processor_or_none(cfg.student.path))
        if rank() == 0:
            for note in pair.notes:
                print(f"[train] pair check: {note}", flush=True)
        if zero3 is not None:
            before_partitioned_load()
        with whole_loading(zero3) if cfg.teacher_placement == "replicated" else contextlib.nullcontext():
            teacher = load_vlm(cfg.teacher.path, precision=precision, attention=cfg.attention)
        teacher.config.image_token_id = pair.image_token_id  # the student's tokenizer encodes both passes' text
        if cfg.teacher_placement == "replicated":  # outside the engine, which would otherwise move it
            from deepspeed.accelerator import get_accelerator
            teacher.to(get_accelerator().current_device_name())
        sizes = (teacher_config.text_config.vocab_size, student_config.text_config.vocab_size)
        shared_vocab = pair.shared_vocab if pair.shared_vocab < max(sizes) else None
    if zero3 is not None:
        before_partitioned_load()
    student = load_vlm(cfg.student.path, precision=precision, attention=cfg.attention)
    prepare_models(cfg, student, teacher)
    return student, teacher, tokenizer, shared_vocab


def prepare_models(cfg, student, teacher) -> None:
    """What the config asks of the models once built: a frozen E_S, gradient checkpointing."""
    from recipe.models import enable_switch_checkpointing, family_of

    family = family_of(student)
    if not cfg.train_vision_tower:
        for parameter in family.parts(student)["vision"]:
            parameter.requires_grad_(False)
    if cfg.gradient_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if teacher is not None:
            enable_switch_checkpointing(family.language_model(teacher))


def _image_processor_or_none(path: str):
    """For the pair check, which compares image processors only when both load: a missing one is reported by
    build_data, after the pair check has named every mismatch of the configs."""
    from recipe.models import load_image_processor

    try:
        return load_image_processor(path)
    except FileNotFoundError:
        return None


def check_paths(cfg) -> None:
    """Everything the run reads or writes later, checked before anything is loaded: a missing eval split
    must not surface after hours of training. (Model paths: build_models; ds_config: deepspeed_config.)"""
    from recipe.data import ShardDataset

    for key in ("data.train", "data.eval"):
        dirs = getattr(cfg.data, key.split(".")[1])
        try:
            if dirs:
                ShardDataset(dirs)  # each index.json, and every shard file it lists
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"{key}: {e}") from e
    try:
        os.makedirs(cfg.output_dir, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"output_dir: cannot create {cfg.output_dir!r}: {e}") from e
    if not os.access(cfg.output_dir, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir: {cfg.output_dir!r} is not writable")


def build_data(cfg, student, tokenizer):
    from recipe.data import Collator, ResumableDistributedSampler, ShardDataset, SkipUnreadable
    from recipe.models import ImageInputs, load_image_inputs, load_image_processor, same_preprocessing

    dataset = SkipUnreadable(ShardDataset(cfg.data.train))  # bad data met in training is skipped, not fatal
    # One global order whatever the number of ranks, cut into optimizer steps and micro-batches of fixed
    # sizes: a run resumed on another number of ranks continues it (recipe/resume.py).
    sampler = ResumableDistributedSampler(len(dataset), rank=rank(), world_size=world_size(), seed=cfg.seed,
                                          drop_last=True, micro_batch_size=cfg.micro_batch_size,
                                          step_size=cfg.micro_batch_size * cfg.grad_accum * world_size())
    student_images = load_image_inputs(cfg.student.path, student.config, tokenizer)
    teacher_images = None
    if cfg.distill:
        from transformers import AutoConfig

        teacher_processor = load_image_processor(cfg.teacher.path)
        if not same_preprocessing(teacher_processor, student_images.image_processor):  # else one set serves both
            teacher_images = ImageInputs(family=student_images.family, config=AutoConfig.from_pretrained(
                cfg.teacher.path), image_processor=teacher_processor, image_token=student_images.image_token)
    collator = Collator(tokenizer, images=student_images, max_length=cfg.data.max_length, template=cfg.data.template,
                        teacher_images=teacher_images, chat_template=chat_template_for(cfg.student.path, student))
    return dataset, sampler, collator


def chat_template_for(path: str, model) -> str | None:
    """The processor's chat template for families whose turns are multimodal messages (None: the tokenizer's)."""
    from recipe.models import family_of, load_chat_template

    return load_chat_template(path) if family_of(model).message_format == "multimodal" else None


def plan_steps(cfg, num_samples: int, world: int) -> int:
    """Optimizer steps of the run: max_steps, or epochs x steps per epoch. An epoch is a whole number of
    optimizer steps (the sampler cuts its order there), so it must hold at least one."""
    global_batch = cfg.micro_batch_size * cfg.grad_accum * world
    steps_per_epoch = num_samples // global_batch
    if steps_per_epoch == 0:
        raise ConfigError(f"one optimizer step takes micro_batch_size x grad_accum x ranks = {cfg.micro_batch_size} "
                          f"x {cfg.grad_accum} x {world} = {global_batch} samples, data.train has {num_samples}; "
                          f"lower micro_batch_size or grad_accum, or add data")
    if cfg.max_steps:
        return cfg.max_steps
    return max(1, int(cfg.epochs * steps_per_epoch))


def _init_worker(worker_id: int) -> None:
    """In DataLoader workers. SLURM signals every process of a job step (scancel, requeue, preemption); a
    worker killed by that SIGTERM would crash the trainer before it can save. The trainer alone decides
    when to stop, and shuts its workers down itself (MicroBatches.close); a trainer that dies takes its
    workers with it."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    die_with_parent()


class MicroBatches:
    """Micro-batches forever, epoch after epoch, from wherever the sampler stands (one DataLoader pass
    per epoch). close() ends the DataLoader's workers: it runs at interpreter exit, whatever ended the
    run (an exception anywhere, sys.exit), before multiprocessing's own exit handler, which would wait
    forever for workers that ignore its SIGTERM."""

    def __init__(self, dataset, sampler, collator, cfg):
        self.sampler = sampler
        self.loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.micro_batch_size, sampler=sampler,
                                                  collate_fn=collator, num_workers=cfg.data.num_workers,
                                                  drop_last=True, persistent_workers=False,
                                                  worker_init_fn=_init_worker)
        self._epoch = None  # the DataLoader's iterator over this epoch; never held by a local variable
        atexit.register(self.close)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        while True:
            if self._epoch is None:
                self._epoch = iter(self.loader)
            batch = next(self._epoch, None)
            if batch is not None:
                return batch
            self._epoch = None
            self.sampler.set_epoch(self.sampler.epoch + 1)

    def close(self) -> None:
        self._epoch = None  # the last reference: DataLoader shuts its workers down (end signal, join)
        kill_worker_processes()  # any that did not stop in time


def stand_in_batch(pad_id: int) -> dict:
    """Stands in when every sample of a micro-batch was too long: every rank must still run the step
    (ZeRO's collectives), so run one padding token that carries no loss (run_passes adds the stand-in
    image that keeps the module calls of all ranks in step)."""
    return {"input_ids": torch.full((1, 1), pad_id), "attention_mask": torch.ones(1, 1, dtype=torch.long),
            "labels": torch.full((1, 1), -100), "has_image": torch.zeros(1, dtype=torch.bool)}


def evaluate_during_training(cfg, engine, student, tokenizer, step: int) -> dict:
    """Exact-match accuracy of the student on data.eval; every rank answers its share (ZeRO-3 keeps
    the ranks' generate calls in step), rank 0 gets the summary."""
    import torch.distributed as dist

    from recipe.data import ShardDataset
    from recipe.evaluate import evaluate_model, format_summary, summarize
    from recipe.models import load_image_processor

    dataset = ShardDataset(cfg.data.eval)
    count = len(dataset) if cfg.eval_max_samples is None else min(len(dataset), cfg.eval_max_samples)
    results = evaluate_model(student, tokenizer, load_image_processor(cfg.student.path), dataset,
                             range(rank(), count, world_size()), batch_size=cfg.eval_batch_size,
                             max_new_tokens=cfg.eval_max_new_tokens, synced_gpus=engine.zero_optimization_stage() == 3,
                             progress=False, template=cfg.data.template, max_length=cfg.data.max_length,
                             chat_template=chat_template_for(cfg.student.path, student))
    if dist.is_initialized():
        gathered = [None] * world_size()
        dist.all_gather_object(gathered, results)
        results = [r for part in gathered for r in part]
    summary = summarize(results)
    if rank() == 0:
        print(f"\n[eval] step {step}: {format_summary(summary)}", flush=True)
    return {"step": step, "eval": summary}


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


@dataclass
class Run:
    """What the loop works with, built once at start-up."""
    engine: object  # the DeepSpeed engine over SwitchKDModel(student, teacher)
    scheduler: object
    student: torch.nn.Module
    tokenizer: object
    sampler: object
    data: MicroBatches
    max_steps: int
    zero3_loading: object  # ZeRO-3's partitioned loading, kept alive for the run (transformers holds a weak ref)
    comms: object = None  # recipe.comms.CommsMeter with log_comms: each step's collectives


def build_engine(cfg, ds_config: dict, student, teacher, max_steps: int, shared_vocab: int | None = None):
    """(engine, LR scheduler): the one DeepSpeed engine over the trainable student and the frozen teacher (the
    optimizer sees the student only; a replicated teacher is held outside it); shared_vocab: the id range the
    divergences compare (build_models)."""
    import deepspeed

    from recipe.models import SwitchKDModel

    engine, _, _, scheduler = deepspeed.initialize(
        model=SwitchKDModel(student, teacher, cfg.loss, shared_vocab, teacher_placement=cfg.teacher_placement),
        model_parameters=param_groups(student, cfg.optim.weight_decay),
        config=ds_config, lr_scheduler=lambda opt: warmup_cosine(opt, warmup_steps=cfg.optim.warmup_steps,
                                                                 max_steps=max_steps,
                                                                 min_lr_ratio=cfg.optim.min_lr_ratio))
    return engine, scheduler


def build_run(cfg, precision: str, load_universal: bool = False) -> Run:
    """Models, data and the engine (build_engine). A bad pair, path or size raises ConfigError, before any
    training. load_universal: the engine resumes from a universal checkpoint (recipe/resume.py)."""
    from recipe.comms import CommsMeter

    try:
        ds_config = deepspeed_config(cfg, precision, load_universal=load_universal)
        zero3 = zero3_loading(ds_config)  # ZeRO-3: no rank ever holds a whole model (unless replicated)
        student, teacher, tokenizer, shared_vocab = build_models(cfg, precision, zero3)
        dataset, sampler, collator = build_data(cfg, student, tokenizer)
        if cfg.data.group_by_length:
            from recipe.data.lengths import estimate_lengths
            sampler.group_by_length(estimate_lengths(dataset.dataset, cfg.data.train, collator, cfg.data.max_length,
                                                     progress=rank() == 0), cfg.data.length_group_size)
        max_steps = plan_steps(cfg, len(dataset), world_size())
    except ConfigError:
        raise
    except (ValueError, FileNotFoundError) as e:  # a bad pair (IncompatiblePair), a missing file, bad data
        raise ConfigError(str(e)) from e
    if rank() == 0:
        (s_total, s_here), (t_total, t_here) = parameter_counts(student), parameter_counts(teacher)
        print(f"[train] loaded student {s_total / 1e6:.1f}M and teacher {t_total / 1e6:.1f}M parameters; "
              f"rank 0 holds {(s_here + t_here) / (s_total + t_total):.0%} of them", flush=True)
        if teacher is not None:
            print(f"[train] {teacher_line(cfg, ds_config, student, teacher)}", flush=True)
    engine, scheduler = build_engine(cfg, ds_config, student, teacher, max_steps, shared_vocab)
    return Run(engine=engine, scheduler=scheduler, student=student, tokenizer=tokenizer, sampler=sampler,
               data=MicroBatches(dataset, sampler, collator, cfg), max_steps=max_steps, zero3_loading=zero3,
               comms=CommsMeter() if cfg.log_comms else None)


def teacher_line(cfg, ds_config: dict, student, teacher) -> str:
    """Where the teacher lives, its memory per GPU and the expected parameter gathers per step. The gather
    model (recipe/comms.py) knows the LLaVA layout; for other families the line gives the memory only."""
    from recipe.comms import Layout, placement_summary, size, vlm_blocks
    from recipe.models import family_of

    if "llava" not in family_of(teacher).model_types:
        total, held = parameter_counts(teacher)
        bytes_per = next(teacher.parameters()).dtype.itemsize
        return (f"teacher ({cfg.teacher_placement}): {size(held * bytes_per)} of its {size(total * bytes_per)} "
                f"per GPU; parameter gathers are modelled for the LLaVA layout only")
    checkpointing = cfg.gradient_checkpointing
    return placement_summary(
        vlm_blocks(student, trainable=True, checkpointing=checkpointing, train_vision_tower=cfg.train_vision_tower),
        vlm_blocks(teacher, trainable=False, checkpointing=checkpointing),
        # A micro-batch of up to chunk_rows supervised rows: one chunk of the loss head.
        Layout.from_ds_config(ds_config, world_size(), head_chunks=1 if cfg.loss.chunk_rows else 0),
        switch=cfg.loss.vsd_weight > 0,
        placement=cfg.teacher_placement)


def train_step(run: Run, cfg) -> tuple[dict, list[dict]]:
    """One optimizer step: grad_accum micro-batches, each forward and backward; DeepSpeed steps the optimizer
    and the LR schedule at the accumulation boundary, unless the gradient norm is not finite: then it skips
    both, on every rank (a non-finite loss is made to count as one: backward_source), and the record says
    why (bad_step) and which samples the step had (bad_step_samples). Returns the step's record, averaged
    over the ranks, and the samples all ranks left out as bad data (for skipped.jsonl)."""
    started = time.time()
    world = world_size()
    if run.comms is not None:
        run.comms.reset()  # only this step's collectives (not an evaluation's or a checkpoint's)
    lr = run.scheduler.get_last_lr()[0]  # the LR this step uses
    sums = dict.fromkeys(LOSS_TERMS, 0.0)
    tokens = slots = dropped = 0  # slots: tokens + padding
    skipped, sample_ids = [], []
    for _ in range(cfg.grad_accum):
        batch = next(run.data)
        run.sampler.advance(cfg.micro_batch_size * world)
        dropped += sum(batch["dropped"].values())
        skipped += batch["skipped"]
        sample_ids += batch["ids"]
        if batch["input_ids"].shape[0] == 0:
            batch = stand_in_batch(run.tokenizer.pad_token_id)
        tokens += int(batch["attention_mask"].sum())
        slots += batch["attention_mask"].numel()
        out = run.engine(to_device(batch, run.engine.device))
        run.engine.backward(backward_source(out["loss"]))
        run.engine.step()
        terms = torch.stack([out[key].detach().float() for key in LOSS_TERMS]).tolist()  # one device sync, not four
        for key, value in zip(LOSS_TERMS, terms):
            sums[key] += value / cfg.grad_accum
    *terms, tokens, slots, dropped, any_skipped = all_reduce_mean(
        [*sums.values(), tokens, slots, dropped, len(skipped)], run.engine.device)
    elapsed = time.time() - started
    record = {**dict(zip(LOSS_TERMS, terms)), "lr": lr, "grad_norm": _float(run.engine.get_global_grad_norm()),
              "samples_per_s": cfg.micro_batch_size * cfg.grad_accum * world / elapsed,
              "tokens_per_s": tokens * world / elapsed, "padding_fraction": 1 - tokens / slots,
              "dropped_samples": int(round(dropped * world)), "skipped_samples": int(round(any_skipped * world)),
              "epoch": run.sampler.epoch}
    if run.comms is not None:
        record["comms"] = run.comms.read()  # this rank's (rank 0 writes the record)
    # Both conditions hold on every rank alike (reduced values, DeepSpeed's global norm): so do the gathers.
    reason = bad_step_reason(dict(zip(LOSS_TERMS, terms)), run.engine.was_step_applied(), run.engine.fp16_enabled())
    if reason is not None:
        record.update(bad_step=reason, bad_step_samples=all_gather_lists(sample_ids))
    return record, (all_gather_lists(skipped) if any_skipped else [])


def finish(run: Run, cfg, step: int, metrics: MetricsLog) -> None:
    """Export the student, then evaluate it once per final step: a rerun of a finished job finds
    final/eval.json and does not evaluate again; a run extended past that step is evaluated again."""
    final_dir = os.path.join(cfg.output_dir, "final")
    already_evaluated = evaluated_step(final_dir) == step
    export_student(run.engine, run.student, final_dir, run.tokenizer, cfg.student.path)
    if rank() == 0:
        print(f"[train] done: {step} steps; student exported to {final_dir}", flush=True)
    if cfg.data.eval and not already_evaluated:
        record = evaluate_during_training(cfg, run.engine, run.student, run.tokenizer, step)
        if rank() == 0:  # atomically: it marks the run as evaluated at this step (here and in recipe.ablation)
            write_atomically(os.path.join(final_dir, "eval.json"),
                             json.dumps({"step": step, **record["eval"]}, indent=1).encode())
        metrics.write(record)
    elif already_evaluated and not metrics.has_eval(step):  # killed between the two writes above
        metrics.write({"step": step, "eval": {k: v for k, v in final_evaluation(final_dir).items() if k != "step"}})


@record  # under torchrun: the failing rank's traceback goes into torchrun's error summary
def main(argv=None):
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        check_paths(cfg)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    precision = cfg.precision if cfg.precision != "auto" else auto_precision()
    stop = StopRequest()  # first: a preemption signal during start-up must not be lost
    if "TORCHELASTIC_RUN_ID" in os.environ:  # started by torchrun (not by a shell it may outlive)
        die_with_parent()

    # ---- distributed
    import deepspeed
    ensure_distributed_env()
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    seed_everything(cfg.seed)
    is_main = rank() == 0

    # ---- resume plan, before anything is loaded: the checkpoint's global batch on this number of ranks
    checkpoint_dir = os.path.join(cfg.output_dir, "checkpoints")
    tag = latest_tag(checkpoint_dir)
    plan = None
    if tag is not None:
        try:
            plan = plan_resume(cfg, checkpoint_dir, tag, world_size())
        except ConfigError as e:
            sys.exit(f"config error: {e}")
        cfg = plan.config  # grad_accum recomputed to keep the global batch
        if is_main and plan.startup_line():
            print(f"[train] {plan.startup_line()}", flush=True)
        if plan.universal:
            prepare_universal(checkpoint_dir, tag)

    # ---- models, data and engine
    try:
        run = build_run(cfg, precision, load_universal=plan is not None and plan.universal)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    engine = run.engine

    # ---- resume
    os.makedirs(cfg.output_dir, exist_ok=True)
    step, state = 0, {}
    if plan is not None:
        state = load_checkpoint(engine, checkpoint_dir, tag, universal=plan.universal)
        step = state["step"]
        run.sampler.load_state_dict(state["sampler"])
        if is_main:
            print(f"[train] resumed from {checkpoint_dir}/{tag} at step {step}", flush=True)
    elif is_main:
        write_atomically(os.path.join(cfg.output_dir, "config.json"), json.dumps(to_dict(cfg), indent=2).encode())
    metrics = MetricsLog(os.path.join(cfg.output_dir, "metrics.jsonl"), resume_step=step, report_to=cfg.report_to,
                         run_config=to_dict(cfg))
    skips = SkippedSamples(JsonlLog(os.path.join(cfg.output_dir, "skipped.jsonl"), resume_step=step),
                           epoch_size=run.sampler.num_samples, max_fraction=cfg.data.max_skipped_fraction,
                           state=state.get("skipped"))
    bad_steps = BadSteps(cfg.max_bad_steps, state=state.get("bad_steps"))
    last_saved = os.path.join(checkpoint_dir, tag) if tag is not None else None  # named when a run stops

    # ---- loop
    from tqdm import tqdm
    bar = tqdm(total=run.max_steps, initial=step, disable=not is_main, desc="train", dynamic_ncols=True)
    engine.train()
    while step < run.max_steps:
        record, skipped = train_step(run, cfg)
        step += 1
        if step % cfg.log_every == 0 or step == run.max_steps or "bad_step" in record:
            metrics.write({"step": step, **record})
        if "bad_step" in record and is_main:
            print(f"\n[train] step {step} skipped ({record['bad_step']}; no update): samples "
                  f"{record['bad_step_samples']}", flush=True)
        skips.add(skipped, step, record["epoch"])  # these raise RunStopped on every rank alike
        bad_steps.update(step, "bad_step" in record, last_saved)
        check_weights(not any_rank(not weights_finite(run.student), engine.device), step, last_saved)
        bar.set_postfix(loss=f"{record['loss']:.4f}", ce=f"{record['ce']:.3f}", align=f"{record['align']:.3f}",
                        vsd=f"{record['vsd']:.3f}", sps=f"{record['samples_per_s']:.1f}")
        bar.update(1)

        if cfg.data.eval and cfg.eval_every and step % cfg.eval_every == 0 and step < run.max_steps:
            metrics.write(evaluate_during_training(cfg, engine, run.student, run.tokenizer, step))
            engine.train()

        stopping = any_rank(stop.requested, engine.device)
        if step % cfg.save_every == 0 or stopping or step == run.max_steps:
            saved = save_checkpoint(engine, checkpoint_dir, step, {
                **run_state(cfg, step, run.sampler.state_dict(), world_size()), "skipped": skips.state_dict(),
                "bad_steps": bad_steps.state_dict()}, cfg.keep_checkpoints)
            last_saved = os.path.join(checkpoint_dir, saved)
        if stopping and step < run.max_steps:
            if is_main:
                print(f"\n[train] stop requested ({stop.signal_name or 'another rank'}): saved step {step}, "
                      f"exiting; rerun the same command to resume", flush=True)
            bar.close()
            metrics.close()
            return 0
    bar.close()
    finish(run, cfg, step, metrics)
    metrics.close()
    return 0


def _float(x) -> float | None:
    return None if x is None else float(x)


if __name__ == "__main__":
    sys.exit(main())
