"""One optimizer step of the recipe at a named shape: time per step and per phase, peak memory, MFU.

    python tests/perf/bench_step.py --shape tinyllava --device cuda [--steps 5] [--warmup 2]
                                    [--mode sft switchkd ...] [--set key=value ...] [--peak-tflops 790]
    python tests/perf/bench_step.py --shape demo --device cpu

What runs is the recipe's own step: its config (recipe.config, with --set overrides), the DeepSpeed engine over
SwitchKDModel (recipe.train.build_engine, recipe.engine: ZeRO-2, one process) and recipe.train.train_step, on
random-init models built at the shape, with one synthetic micro-batch repeated (the data path is not measured).
Shapes:
  tinyllava  student Qwen2-0.5B + SigLIP-so400m (1.04B parameters), teacher Qwen2.5-3B + SigLIP-so400m (3.8B),
             untied LM heads, vocabulary 151,936, 729 image tokens per 384 px image (SigLIP's hidden_states[-2],
             all patches, as TinyLLaVA takes them); 8 samples x 1,049 tokens, no padding, 1,272 supervised tokens
  demo       the demo pair of recipe/models/tiny.py (vocabulary 401, 16 image tokens); 16 samples x 48 tokens,
             48 supervised; for the CPU
Modes (MODES below): sft, switchkd, and switchkd with the loss head unchunked, with gradient checkpointing,
with the torch DBiLD reference.

Per phase, measured by instrumenting the step, not by a copy of it: forward hooks on SwitchKDModel and on the
language models, and wrappers around engine.backward / engine.step, place marks (CUDA events on a GPU, wall
clock on the CPU, where every op is synchronous); a phase lasts from the previous mark to its own:
  data        train_step's start to the forward: next batch, copy to the device
  student     E_S, P_S and L_S (the student pass)
  teacher     E_T, P_T and L_T under no_grad (the teacher pass)
  switch      P_T and L_T on E_S's features (the switch pass)
  losses      the loss head: LM heads, CE and both divergences (forward)
  backward    engine.backward (with any recomputation: checkpointed layers, the chunked loss head)
  optimizer   engine.step (gradient clipping, AdamW)
  record      the rest of train_step (reading the loss terms back)

FLOP model (model FLOPs: recomputation is not counted, so checkpointing lowers MFU rather than raising it):
a forward costs 2 x (weights of the Linear / Conv2d layers a token goes through) per token, plus attention
4 x T^2 x (heads x head_dim) per layer and sequence (halved for the causal language models, not for the vision
encoder), plus 2 x V x H per supervised row for an LM head. A backward costs 2 forwards, 1 when only the
activations need gradients. The step: 3 x the student's forward (E_S, P_S, L_S, head), + 1 x the teacher's
forward (E_T, P_T, L_T, head) when distilling, + 2 x (P_T, L_T and the head over the switch rows) for VSD.
MFU = step FLOPs / time / peak; the peak defaults to 790 TFLOP/s on CUDA (the bf16 dense matmul rate
measured on an H200, docs/method.md's performance contract; the data sheet says 989) and is not set on the
CPU (mfu null) unless --peak-tflops gives it.

Memory: peak_mem_GB is torch.cuda.max_memory_allocated() over the timed steps (10^9 bytes) on CUDA; on the
CPU the process's peak resident set so far (every mode run before included).
Output: one JSON line per mode as soon as it is measured, then a markdown table of all of them.
"""
from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch
from torch import nn

PHASES = ("data", "student", "teacher", "switch", "losses", "backward", "optimizer", "record")


@dataclass(frozen=True)
class Shape:
    student_text: dict  # Qwen2Config sizes
    teacher_text: dict
    vision: dict  # SiglipVisionConfig sizes
    vocab: int
    image_token_id: int
    vision_feature_layer: int
    batch: int  # samples per micro-batch, each with one image
    tokens: int  # per sample, its image tokens included; no padding
    supervised: int  # supervised tokens of the micro-batch, spread evenly over the samples
    text_extra: dict = field(default_factory=dict)  # for both language models

    @property
    def image_tokens(self) -> int:
        return (self.vision["image_size"] // self.vision["patch_size"]) ** 2


SHAPES = {
    "tinyllava": Shape(
        student_text=dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                          num_key_value_heads=2),  # Qwen2-0.5B
        teacher_text=dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                          num_key_value_heads=2),  # Qwen2.5-3B
        vision=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                    image_size=384, patch_size=14, vision_use_head=False),  # SigLIP-so400m-patch14-384
        vocab=151936, image_token_id=151665, vision_feature_layer=-2, batch=8, tokens=1049, supervised=1272,
        text_extra=dict(max_position_embeddings=32768, rms_norm_eps=1e-6)),
    "demo": Shape(  # recipe/models/tiny.py's demo-student / demo-teacher
        student_text=dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2),
        teacher_text=dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                          num_key_value_heads=2),
        vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    image_size=32, patch_size=8),
        vocab=401, image_token_id=400, vision_feature_layer=-1, batch=16, tokens=48, supervised=48,
        text_extra=dict(max_position_embeddings=1024)),
}

SFT = {"teacher.path": None, "loss.align_weight": 0.0, "loss.vsd_weight": 0.0}
MODES = {  # config overrides of each mode, on top of the recipe's defaults
    "sft": SFT,
    "sft_gc": {**SFT, "gradient_checkpointing": True},
    "switchkd": {},
    "switchkd_unchunked": {"loss.chunk_rows": 0},
    "switchkd_gc": {"gradient_checkpointing": True},
    "switchkd_gc_unchunked": {"gradient_checkpointing": True, "loss.chunk_rows": 0},
    "switchkd_torch_loss": {"loss.impl": "torch"},
}


def vlm_config(shape: Shape, text: dict):
    from transformers import LlavaConfig, Qwen2Config, SiglipVisionConfig

    return LlavaConfig(vision_config=SiglipVisionConfig(**shape.vision),
                       text_config=Qwen2Config(vocab_size=shape.vocab, tie_word_embeddings=False,
                                               **text, **shape.text_extra),
                       image_token_id=shape.image_token_id, vision_feature_select_strategy="full",
                       vision_feature_layer=shape.vision_feature_layer, projector_hidden_act="gelu",
                       image_seq_length=shape.image_tokens, tie_word_embeddings=False)


def random_vlm(config, device: str, precision: str, attention: str) -> nn.Module:
    """A random-init model built on the device, in the training precision."""
    from transformers import AutoModelForImageTextToText

    from recipe.models.loading import DTYPES, pick_attention

    with torch.device(device):
        return AutoModelForImageTextToText.from_config(config, dtype=DTYPES[precision],
                                                       attn_implementation=pick_attention(attention, precision))


def synthetic_batch(shape: Shape) -> dict:
    """One collated micro-batch (recipe/data/collate.py's layout): a first token, the image tokens, text; the
    last tokens of each sample supervised."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, shape.image_token_id, (shape.batch, shape.tokens), generator=generator)
    input_ids[:, 1:1 + shape.image_tokens] = shape.image_token_id
    labels = torch.full_like(input_ids, -100)
    for sample in range(shape.batch):
        answer = shape.supervised // shape.batch + (sample < shape.supervised % shape.batch)
        labels[sample, -answer:] = input_ids[sample, -answer:]
    size = shape.vision["image_size"]
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels,
            "pixel_values": torch.randn(shape.batch, 3, size, size, generator=generator),
            "has_image": torch.ones(shape.batch, dtype=torch.bool), "ids": list(range(shape.batch)), "dropped": {},
            "skipped": []}


def bench_config(shape_name: str, mode: str, max_steps: int, overrides: list[str], output_dir: str):
    """The recipe config of one mode: the shape's micro-batch, ZeRO-2, SDPA attention (as the reference
    figures), the mode's overrides, then --set."""
    from recipe.config import load_config

    shape = SHAPES[shape_name]
    values = {"output_dir": output_dir, "student.path": f"<random-init {shape_name} student>",
              "teacher.path": f"<random-init {shape_name} teacher>", "data.train": ["<synthetic batch>"],
              "max_steps": max_steps, "micro_batch_size": shape.batch, "grad_accum": 1, "zero_stage": 2,
              "attention": "sdpa", **MODES[mode]}
    return load_config(None, [f"{key}={json.dumps(value)}" for key, value in values.items()] + overrides)


class PhaseClock:
    """Marks the end of each phase of a step; a phase lasts from the previous mark to its own."""

    def __init__(self, cuda: bool):
        self.cuda, self.marks = cuda, []

    def mark(self, phase: str) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append((phase, event))
        else:
            self.marks.append((phase, time.perf_counter()))

    def take(self) -> dict[str, float]:
        """Milliseconds per phase since the first mark; clears the marks."""
        if self.cuda:
            torch.cuda.synchronize()
        phases = dict.fromkeys(PHASES, 0.0)
        for (_, start), (phase, end) in zip(self.marks, self.marks[1:]):
            phases[phase] += start.elapsed_time(end) if self.cuda else (end - start) * 1e3
        self.marks = []
        return phases


def instrument(engine, clock: PhaseClock) -> list:
    """Marks from hooks on SwitchKDModel and the language models, and around engine.backward / engine.step."""
    model = engine.module
    teacher_calls = [0]

    def forward_starts(*_):
        teacher_calls[0] = 0
        clock.mark("data")

    def teacher_language_done(*_):
        teacher_calls[0] += 1
        clock.mark("teacher" if teacher_calls[0] == 1 else "switch")

    handles = [model.register_forward_pre_hook(forward_starts),
               model.student.model.language_model.register_forward_hook(lambda *_: clock.mark("student")),
               model.register_forward_hook(lambda *_: clock.mark("losses"))]
    if model.teacher is not None:
        handles.append(model.teacher.model.language_model.register_forward_hook(teacher_language_done))
    for name, phase in (("backward", "backward"), ("step", "optimizer")):
        method = getattr(engine, name)

        def marked(*args, _method=method, _phase=phase, **kwargs):
            result = _method(*args, **kwargs)
            clock.mark(_phase)
            return result
        setattr(engine, name, marked)
    return handles


def matmul_weights(module: nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))


def attention_flops(config, tokens: int, causal: bool) -> float:
    """QK^T and AV of one sequence over all layers, forward."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    full = 4 * config.num_hidden_layers * tokens ** 2 * config.num_attention_heads * head_dim
    return full / 2 if causal else full


def forward_flops(vlm, shape: Shape) -> dict[str, float]:
    """Forward FLOPs of each part of one VLM over the micro-batch; "head" per supervised row."""
    config = vlm.config
    patches = shape.batch * shape.image_tokens  # SigLIP: one vision token per patch, all of them kept
    tokens = shape.batch * shape.tokens
    return {"vision": 2 * matmul_weights(vlm.model.vision_tower) * patches
            + shape.batch * attention_flops(config.vision_config, shape.image_tokens, causal=False),
            "projector": 2 * matmul_weights(vlm.model.multi_modal_projector) * patches,
            "language": 2 * matmul_weights(vlm.model.language_model) * tokens
            + shape.batch * attention_flops(config.text_config, shape.tokens, causal=True),
            "head": 2 * vlm.lm_head.weight.numel()}


def step_flops(cfg, student, teacher, shape: Shape) -> float:
    rows = shape.supervised  # every sample has an image: the switch pass has all rows
    own = forward_flops(student, shape)
    flops = 3 * (own["vision"] + own["projector"] + own["language"] + own["head"] * rows)
    if teacher is not None:
        ref = forward_flops(teacher, shape)
        flops += ref["vision"] + ref["projector"] + ref["language"] + ref["head"] * rows
        if cfg.loss.vsd_weight > 0:
            flops += 2 * (ref["projector"] + ref["language"] + ref["head"] * rows)
    return flops


def peak_memory_gb(cuda: bool) -> float:
    if cuda:
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: kilobytes


def run_mode(mode: str, args, output_dir: str) -> dict:
    from recipe.data import ResumableDistributedSampler
    from recipe.engine import deepspeed_config
    from recipe.train import Run, auto_precision, build_engine, prepare_models, train_step

    shape, cuda = SHAPES[args.shape], args.device == "cuda"
    memory_before = torch.cuda.memory_allocated() / 1e9 if cuda else None  # > 0: an earlier mode left memory
    total_steps = args.warmup + args.steps
    cfg = bench_config(args.shape, mode, total_steps, args.overrides, output_dir)
    precision = cfg.precision if cfg.precision != "auto" else auto_precision()
    torch.manual_seed(0)
    student = random_vlm(vlm_config(shape, shape.student_text), args.device, precision, cfg.attention)
    teacher = None
    if cfg.distill:
        teacher = random_vlm(vlm_config(shape, shape.teacher_text), args.device, precision, cfg.attention)
    prepare_models(cfg, student, teacher)
    params = {role: sum(p.numel() for p in m.parameters()) if m is not None else 0
              for role, m in (("student", student), ("teacher", teacher))}
    flops = step_flops(cfg, student, teacher, shape)
    engine, scheduler = build_engine(cfg, deepspeed_config(cfg, precision), student, teacher, total_steps)
    sampler = ResumableDistributedSampler(shape.batch * total_steps, rank=0, world_size=1, seed=0)
    run = Run(engine=engine, scheduler=scheduler, student=student, tokenizer=None, sampler=sampler,
              data=itertools.repeat(synthetic_batch(shape)), max_steps=total_steps, zero3_loading=None)
    clock = PhaseClock(cuda)
    handles = instrument(engine, clock)
    engine.train()
    timed, record = [], {}
    for step in range(total_steps):
        if step == args.warmup and cuda:
            torch.cuda.reset_peak_memory_stats()
        clock.mark("start")
        record, _ = train_step(run, cfg)
        clock.mark("record")
        phases = clock.take()
        if step >= args.warmup:
            timed.append(phases)
    peak = peak_memory_gb(cuda)
    for handle in handles:
        handle.remove()
    del run, engine, scheduler, student, teacher
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()

    phases = {phase: statistics.median(step[phase] for step in timed) for phase in PHASES}
    ms = statistics.median(sum(step.values()) for step in timed)
    peak_tflops = args.peak_tflops if args.peak_tflops is not None else (790.0 if cuda else None)
    return {"mode": mode, "shape": args.shape, "device": args.device, "precision": precision,
            "attention": cfg.attention, "chunk_rows": cfg.loss.chunk_rows, "loss_impl": cfg.loss.impl,
            "gradient_checkpointing": cfg.gradient_checkpointing, "steps": args.steps,
            "ms_per_step": round(ms, 2), "peak_mem_GB": round(peak, 2),
            "memory_before_GB": None if memory_before is None else round(memory_before, 2),
            "tokens_per_s": round(shape.batch * shape.tokens / (ms / 1e3), 1),
            "tflop_per_step": round(flops / 1e12, 3),
            "mfu": None if peak_tflops is None else round(flops / (ms / 1e3) / (peak_tflops * 1e12), 4),
            "peak_tflops": peak_tflops, "phases_ms": {phase: round(t, 2) for phase, t in phases.items()},
            "params": params, "loss": record.get("loss")}


def markdown_table(results: list[dict]) -> str:
    head = ["mode", "ms/step", "peak GB", "tokens/s", "TFLOP/step", "MFU", *[f"{p} ms" for p in PHASES]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        mfu = "-" if r["mfu"] is None else f"{r['mfu']:.1%}"
        cells = [r["mode"], f"{r['ms_per_step']:.1f}", f"{r['peak_mem_GB']:.1f}", f"{r['tokens_per_s']:.0f}",
                 f"{r['tflop_per_step']:.3g}", mfu, *[f"{r['phases_ms'][p]:.1f}" for p in PHASES]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True)
    parser.add_argument("--device", choices=["cuda", "cpu"], required=True)
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (Triton compilation, "
                                                              "optimizer state allocation)")
    parser.add_argument("--mode", nargs="+", choices=list(MODES), default=["sft", "switchkd"])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe config override for every mode, e.g. --set loss.chunk_rows=512")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the MFU denominator (default: 790 on cuda, none on the cpu)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    from recipe.distributed import ensure_distributed_env

    ensure_distributed_env()
    deepspeed.init_distributed(dist_backend="nccl" if args.device == "cuda" else "gloo")
    if args.device == "cuda":
        torch.cuda.set_device(0)
    results = []
    with tempfile.TemporaryDirectory() as output_dir:
        for mode in args.mode:
            results.append(run_mode(mode, args, output_dir))
            print(json.dumps(results[-1]), flush=True)  # each mode as soon as it is done
    print(markdown_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
