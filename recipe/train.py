"""Switch-KD training (or plain SFT of the student when no teacher is given) on DeepSpeed ZeRO-2/3.

    python -m recipe.train --config recipe/configs/demo_switchkd.yaml [--set key=value ...]

Read top to bottom: config -> distributed -> models -> data -> engine -> resume -> loop -> export.
Rerunning the same command resumes from the newest complete checkpoint in output_dir/checkpoints.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

import torch

from recipe import trainer as T
from recipe.config import ConfigError, load_config, to_dict
from recipe.files import write_atomically


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Switch-KD / SFT training on DeepSpeed")
    parser.add_argument("--config", required=True, help="YAML file (see recipe/configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set optim.lr=1e-4 (repeatable)")
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


def build_models(cfg, precision):
    from recipe.models import check_pair, enable_switch_checkpointing, load_tokenizer, load_vlm

    for role in ("student", "teacher"):
        path = getattr(cfg, role).path
        if path is not None and not os.path.isfile(os.path.join(path, "config.json")):
            raise ConfigError(f"{role}.path: no model checkpoint at {path!r} (expected {path}/config.json)")
    tokenizer = load_tokenizer(cfg.student.path)
    teacher = None
    if cfg.distill:
        from transformers import AutoConfig
        # Checked on configs and tokenizers before any weights are loaded.
        pair = check_pair(AutoConfig.from_pretrained(cfg.teacher.path), AutoConfig.from_pretrained(cfg.student.path),
                          load_tokenizer(cfg.teacher.path), tokenizer)
        if T.rank() == 0:
            for note in pair.notes:
                print(f"[train] pair check: {note}", flush=True)
        teacher = load_vlm(cfg.teacher.path, precision=precision, attention=cfg.attention)
        teacher.config.image_token_id = pair.image_token_id  # the student's tokenizer encodes both passes' text
    student = load_vlm(cfg.student.path, precision=precision, attention=cfg.attention)
    if not cfg.train_vision_tower:
        student.model.vision_tower.requires_grad_(False)
    if cfg.gradient_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if teacher is not None:
            enable_switch_checkpointing(teacher)
    return student, teacher, tokenizer


def build_data(cfg, student, tokenizer):
    from recipe.data import Collator, ResumableDistributedSampler, ShardDataset
    from recipe.models import image_token_count, load_image_processor, same_preprocessing

    dataset = ShardDataset(cfg.data.train)
    sampler = ResumableDistributedSampler(len(dataset), rank=T.rank(), world_size=T.world_size(), seed=cfg.seed)
    student_processor = load_image_processor(cfg.student.path)
    teacher_processor = load_image_processor(cfg.teacher.path) if cfg.distill else None
    if teacher_processor is not None and same_preprocessing(teacher_processor, student_processor):
        teacher_processor = None  # one set of pixel values serves both models
    collator = Collator(tokenizer, student_processor, num_image_tokens=image_token_count(student.config),
                        image_token_id=student.config.image_token_id, max_length=cfg.data.max_length,
                        template=cfg.data.template, teacher_image_processor=teacher_processor)
    return dataset, sampler, collator


def plan_steps(cfg, num_samples: int, world: int) -> int:
    """Optimizer steps of the run: max_steps, or epochs x steps per epoch. Each rank must get at least one
    micro-batch per epoch (otherwise every epoch would yield nothing and the loop would wait forever)."""
    per_rank = -(-num_samples // world)
    if per_rank < cfg.micro_batch_size:
        raise ConfigError(f"data.train has {num_samples} samples, {per_rank} per rank on {world} ranks: fewer than "
                          f"micro_batch_size={cfg.micro_batch_size}; lower micro_batch_size or add data")
    if cfg.max_steps:
        return cfg.max_steps
    steps_per_epoch = num_samples // (cfg.micro_batch_size * world) // cfg.grad_accum
    if steps_per_epoch == 0:
        raise ConfigError(f"epochs: one optimizer step takes micro_batch_size x grad_accum x ranks = "
                          f"{cfg.micro_batch_size * cfg.grad_accum * world} samples, data.train has {num_samples}; "
                          f"lower grad_accum or give max_steps")
    return max(1, int(cfg.epochs * steps_per_epoch))


def _ignore_stop_signals(worker_id: int) -> None:
    """In DataLoader workers. SLURM signals every process of a job step (scancel, requeue, preemption); a
    worker killed by that SIGTERM would crash the trainer before it can save. The trainer alone decides
    when to stop, and shuts its workers down itself."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def batches(dataset, sampler, collator, cfg):
    """Micro-batches forever, epoch after epoch, from wherever the sampler stands."""
    while True:
        loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.micro_batch_size, sampler=sampler,
                                             collate_fn=collator, num_workers=cfg.data.num_workers,
                                             drop_last=True, persistent_workers=False,
                                             worker_init_fn=_ignore_stop_signals)
        for batch in loader:
            yield batch
        sampler.set_epoch(sampler.epoch + 1)


def placeholder_batch(pad_id: int) -> dict:
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
                             range(T.rank(), count, T.world_size()), batch_size=cfg.eval_batch_size,
                             max_new_tokens=cfg.eval_max_new_tokens, synced_gpus=engine.zero_optimization_stage() == 3,
                             progress=False, template=cfg.data.template, max_length=cfg.data.max_length)
    if dist.is_initialized():
        gathered = [None] * T.world_size()
        dist.all_gather_object(gathered, results)
        results = [r for part in gathered for r in part]
    summary = summarize(results)
    if T.rank() == 0:
        print(f"\n[eval] step {step}: {format_summary(summary)}", flush=True)
    return {"step": step, "eval": summary}


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def main(argv=None):
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    precision = cfg.precision if cfg.precision != "auto" else auto_precision()
    stop = T.StopRequest()  # first: a preemption signal during start-up must not be lost

    # ---- distributed
    import deepspeed
    T.ensure_distributed_env()
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    T.seed_everything(cfg.seed)
    is_main = T.rank() == 0

    # ---- models and data (a bad pair or path stops here, before any training)
    try:
        ds_config = T.deepspeed_config(cfg, precision)
        # ZeRO-3: no rank ever holds a whole model. Kept for the run: transformers holds a weak reference.
        _zero3_loading = T.zero3_loading(ds_config)
        student, teacher, tokenizer = build_models(cfg, precision)
        dataset, sampler, collator = build_data(cfg, student, tokenizer)
        world = T.world_size()
        max_steps = plan_steps(cfg, len(dataset), world)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        sys.exit(f"config error: {e}")
    if is_main:
        (s_total, s_here), (t_total, t_here) = T.parameter_counts(student), T.parameter_counts(teacher)
        print(f"[train] loaded student {s_total / 1e6:.1f}M and teacher {t_total / 1e6:.1f}M parameters; "
              f"rank 0 holds {(s_here + t_here) / (s_total + t_total):.0%} of them", flush=True)
    samples_per_step = cfg.micro_batch_size * cfg.grad_accum * world

    # ---- engine: one DeepSpeed engine over student + frozen teacher; the optimizer sees the student only
    from recipe.models import SwitchKDModel
    model = SwitchKDModel(student, teacher, cfg.loss)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=T.param_groups(student, cfg.optim.weight_decay), config=ds_config,
        lr_scheduler=lambda opt: T.warmup_cosine(opt, warmup_steps=cfg.optim.warmup_steps, max_steps=max_steps,
                                                 min_lr_ratio=cfg.optim.min_lr_ratio))
    device = engine.device

    # ---- resume
    os.makedirs(cfg.output_dir, exist_ok=True)
    checkpoint_dir = os.path.join(cfg.output_dir, "checkpoints")
    step = 0
    tag = T.latest_tag(checkpoint_dir)
    if tag is not None:
        state = T.load_checkpoint(engine, checkpoint_dir, tag)
        step = state["step"]
        sampler.load_state_dict(state["sampler"])
        if is_main:
            print(f"[train] resumed from {checkpoint_dir}/{tag} at step {step}", flush=True)
    elif is_main:
        with open(os.path.join(cfg.output_dir, "config.json"), "w") as f:
            json.dump(to_dict(cfg), f, indent=2)
    metrics = T.MetricsLog(os.path.join(cfg.output_dir, "metrics.jsonl"), resume_step=step)
    data = batches(dataset, sampler, collator, cfg)

    # ---- loop
    from tqdm import tqdm
    bar = tqdm(total=max_steps, initial=step, disable=not is_main, desc="train", dynamic_ncols=True)
    engine.train()
    while step < max_steps:
        started = time.time()
        lr = scheduler.get_last_lr()[0]  # the LR this step uses
        sums = {"loss": 0.0, "ce": 0.0, "align": 0.0, "vsd": 0.0}
        tokens = 0
        dropped = 0
        for _ in range(cfg.grad_accum):
            batch = next(data)
            sampler.advance(cfg.micro_batch_size * world)
            dropped += sum(batch["dropped"].values())
            if batch["input_ids"].shape[0] == 0:
                batch = placeholder_batch(tokenizer.pad_token_id)
            tokens += int(batch["attention_mask"].sum())
            out = engine(to_device(batch, device))
            engine.backward(out["loss"])
            engine.step()  # DeepSpeed steps the optimizer and LR schedule at the accumulation boundary
            terms = torch.stack([out[key].detach().float() for key in sums]).tolist()  # one device sync, not four
            for key, value in zip(sums, terms):
                sums[key] += value / cfg.grad_accum
        step += 1

        loss, ce, align, vsd, tokens, dropped = T.all_reduce_mean(
            [sums["loss"], sums["ce"], sums["align"], sums["vsd"], tokens, dropped], device)
        elapsed = time.time() - started
        record = {"step": step, "loss": loss, "ce": ce, "align": align, "vsd": vsd,
                  "lr": lr, "grad_norm": _float(engine.get_global_grad_norm()),
                  "samples_per_s": samples_per_step / elapsed, "tokens_per_s": tokens * world / elapsed,
                  "dropped_samples": int(round(dropped * world)), "epoch": sampler.epoch}
        if step % cfg.log_every == 0 or step == max_steps:
            metrics.write(record)
        bar.set_postfix(loss=f"{loss:.4f}", ce=f"{ce:.3f}", align=f"{align:.3f}", vsd=f"{vsd:.3f}",
                        sps=f"{record['samples_per_s']:.1f}")
        bar.update(1)

        if cfg.data.eval and cfg.eval_every and step % cfg.eval_every == 0 and step < max_steps:
            metrics.write(evaluate_during_training(cfg, engine, student, tokenizer, step))
            engine.train()

        stopping = T.any_rank(stop.requested, device)
        if step % cfg.save_every == 0 or stopping or step == max_steps:
            T.save_checkpoint(engine, checkpoint_dir, step, {"step": step, "sampler": sampler.state_dict()},
                              cfg.keep_checkpoints)
        if stopping and step < max_steps:
            if is_main:
                print(f"\n[train] stop requested ({stop.signal_name or 'another rank'}): saved step {step}, "
                      f"exiting; rerun the same command to resume", flush=True)
            bar.close()
            return 0
    bar.close()

    # ---- export, then a final evaluation (once per final step: a rerun of a finished job finds final/eval.json)
    final_dir = os.path.join(cfg.output_dir, "final")
    already_evaluated = T.evaluated_step(final_dir) == step
    T.export_student(engine, student, final_dir, tokenizer, cfg.student.path)
    if is_main:
        print(f"[train] done: {step} steps; student exported to {final_dir}", flush=True)
    if cfg.data.eval and not already_evaluated:
        record = evaluate_during_training(cfg, engine, student, tokenizer, step)
        metrics.write(record)
        if is_main:  # atomically: it marks the run as evaluated at this step (here and in recipe.ablation)
            write_atomically(os.path.join(final_dir, "eval.json"),
                             json.dumps({"step": step, **record["eval"]}, indent=1).encode())
    return 0


def _float(x) -> float | None:
    return None if x is None else float(x)


if __name__ == "__main__":
    sys.exit(main())
