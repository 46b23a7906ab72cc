"""Communication of a training step: measured with DeepSpeed's comms logger, and modelled (docs/scaling.md).

Measured: with `log_comms: true` the engine logs every collective of deepspeed.comm; `CommsMeter` reads what
one step sent, per collective, as the logger counts it on this rank: calls, and bytes = the message size, i.e.
the tensor this rank hands to the collective (its partition for an all-gather; the whole buffer for a
reduce-scatter or an all-reduce).

Modelled: `predict_step` gives the same figures from the two models' parameters, how ZeRO partitions them,
the passes that use them and grad_accum. What DeepSpeed 0.19.8 does, as measured at the demo shape:
- ZeRO-2: per micro-step one all-reduce of the gradients (bucketed); per step one all-gather of the
  student's updated partitions. No parameter gathers: parameters are never partitioned.
- ZeRO-3: a partitioned parameter is all-gathered when a module that holds it runs (forward, backward, or a
  gradient checkpointing recomputation) and released after it, unless it is used again within
  stage3_max_reuse_distance parameters of the module trace; everything is released at the end of each
  micro-step. Parameters of at most stage3_param_persistence_threshold elements are never partitioned for
  use: they are all-gathered once per step, after the optimizer step (all of them, the teacher's too). Per
  micro-step, the gradients are reduce-scattered. The first step after every start records the module trace
  and gathers more; the model describes the steps after it.
- The passes (recipe/models/switch.py): the student's modules run forward and backward (its vision tower's
  parts after the selected feature layer, forward only); a sharded teacher runs the teacher pass (all of it,
  forward), and for VSD the switch pass: projector, embedding, decoder layers, final norm and LM head
  forward, and all but the embedding backward (into E_S). Checkpointed layers run forward once more in the
  backward, up to their MLP's output projection (non-reentrant checkpointing recomputes only what the
  backward needs). A replicated teacher is outside ZeRO: none of its parameters are gathered.
"""
from __future__ import annotations

from dataclasses import dataclass


class CommsMeter:
    """Collectives from DeepSpeed's comms logger between reset() and read()."""

    def __init__(self):
        from deepspeed.comm import comms_logger

        self.logger = comms_logger

    def reset(self) -> None:
        self.logger.reset_data()  # also keeps its per-call latency lists short

    def read(self) -> dict[str, dict[str, int]]:
        """{collective: {"calls": n, "bytes": message bytes}} since reset()."""
        record = {}
        for name, by_size in sorted(self.logger.get_raw_data().items()):
            calls = sum(entry[0] for entry in by_size.values())
            record[name] = {"calls": calls, "bytes": sum(size * entry[0] for size, entry in by_size.items())}
        return record


# ---------------------------------------------------------------------------------------------------
# The model's parameters, in the blocks the passes run them in


@dataclass(frozen=True)
class Block:
    """Parameters a pass runs together (a decoder layer, an embedding, a projector, a head): the element counts
    of each module's own parameters, in the order the modules run (ZeRO-3 gathers per module)."""
    name: str
    modules: tuple[tuple[int, ...], ...]
    backward: bool = True  # the loss backpropagates through it
    checkpointed: bool = False  # gradient checkpointing runs it forward again inside its backward
    trainable: bool = True

    @property
    def numels(self) -> tuple[int, ...]:
        return tuple(n for module in self.modules for n in module)

    @property
    def numel(self) -> int:
        return sum(self.numels)


@dataclass(frozen=True)
class VLMBlocks:
    vision: tuple[Block, ...]  # embeddings, encoder layers, then forward-only parts (post-norm, pooling head)
    projector: Block
    embed: Block
    layers: tuple[Block, ...]
    norm: Block
    head: Block

    def all(self) -> tuple[Block, ...]:
        return (*self.vision, self.projector, self.embed, *self.layers, self.norm, self.head)

    def numel(self) -> int:
        return sum(block.numel for block in self.all())


def _numel(param) -> int:
    return getattr(param, "ds_numel", param.numel())  # a ZeRO-3 partitioned parameter is empty between uses


def _modules_in_order(module) -> list:
    """The submodules holding parameters of their own, in the order a pre-norm layer runs them: registration
    order, with the k-th norm moved before the k-th other child (input_layernorm before self_attn,
    post_attention_layernorm before mlp; layer_norm1 / layer_norm2 in SigLIP and CLIP)."""
    children = list(module.named_children())
    norms = [c for name, c in children if "norm" in name]
    others = [c for name, c in children if "norm" not in name]
    if len(norms) == len(others) > 1:
        ordered = [m for pair in zip(norms, others) for m in pair]
    else:
        ordered = [c for _, c in children]
    own = [module] if any(True for _ in module.parameters(recurse=False)) else []
    return own + [m for child in ordered for m in _modules_in_order(child)]


def _block(name, module, **kwargs) -> Block:
    return Block(name, tuple(tuple(_numel(p) for p in m.parameters(recurse=False)) for m in _modules_in_order(module)),
                 **kwargs)


def vlm_blocks(vlm, *, trainable: bool, checkpointing: bool, train_vision_tower: bool = True) -> VLMBlocks:
    """The blocks of a LlavaForConditionalGeneration (loaded, partitioned, or built on the meta device).
    trainable: the student; checkpointing: gradient checkpointing of its decoder layers (and of the student's
    vision encoder layers, which train.build_models checkpoints with the rest of the student)."""
    from recipe.models.families.llava import vision_feature_layers

    role = "student" if trainable else "teacher"
    tower = vlm.model.vision_tower
    tower = getattr(tower, "vision_model", tower)
    layers = tower.encoder.layers
    # hidden_states[k] is the output of encoder layer k-1 (0: the embeddings): layers past the deepest selected
    # one run forward only, like the post-norm and the pooling head.
    used = max(k % (len(layers) + 1) for k in vision_feature_layers(vlm.config))
    grad = trainable and train_vision_tower
    tail = [m for name, m in tower.named_children() if name in ("post_layernorm", "head")]
    vision = (_block(f"{role}.vision.embeddings", tower.embeddings, backward=grad, trainable=grad),
              *(_block(f"{role}.vision.layers.{i}", layer, checkpointed=checkpointing and grad and i < used,
                       backward=grad and i < used, trainable=grad) for i, layer in enumerate(layers)),
              Block(f"{role}.vision.tail", tuple(module for m in tail for module in _block("", m).modules),
                    backward=False, trainable=grad))
    language = vlm.model.language_model
    return VLMBlocks(
        vision=vision,
        projector=_block(f"{role}.projector", vlm.model.multi_modal_projector, trainable=trainable),
        # A frozen embedding has no backward: its input is token ids (and see enable_switch_checkpointing).
        embed=_block(f"{role}.embed", language.embed_tokens, backward=trainable, trainable=trainable),
        layers=tuple(_block(f"{role}.layers.{i}", layer, checkpointed=checkpointing, trainable=trainable)
                     for i, layer in enumerate(language.layers)),
        norm=_block(f"{role}.norm", language.norm, trainable=trainable),
        head=_block(f"{role}.head", vlm.lm_head, trainable=trainable))


# ---------------------------------------------------------------------------------------------------
# One micro-step's module trace and what ZeRO sends for it


@dataclass(frozen=True)
class Use:
    """One module of a block running in one phase (forward | backward | recompute). encloses: the number of
    recompute uses that follow and run inside this backward (a checkpointed layer's last module)."""
    block: Block
    module: int
    phase: str
    encloses: int = 0

    @property
    def key(self) -> tuple[str, int]:
        return self.block.name, self.module

    @property
    def numels(self) -> tuple[int, ...]:
        return self.block.modules[self.module]


def micro_step_trace(student: VLMBlocks, teacher: VLMBlocks | None, *, switch: bool,
                     head_chunks: int = 1) -> list[Use]:
    """The modules one micro-step runs, in order: student pass, teacher pass, switch pass, the loss head, then
    the backward, which autograd runs from the most recently built nodes: the switch branch down to E_S's output
    first, then the student. A checkpointed layer's backward starts at its last module, whose saved input makes
    it run the layer forward again first. teacher: None when ZeRO does not hold it (replicated, or plain SFT).

    The loss head (recipe/losses/head.py) runs the LM heads (student, teacher, switch) over head_chunks chunks
    of rows; chunked (head_chunks >= 1), each chunk is checkpointed: its backward, last chunk first, runs the
    chunk's heads forward again, then their backwards. head_chunks = 0: unchunked, the heads run once."""
    def fwd(*blocks):
        return [Use(b, m, "forward") for b in blocks for m in range(len(b.modules))]

    def bwd(*blocks):
        uses = []
        for b in blocks:
            if not b.backward:
                continue
            last, n = len(b.modules) - 1, len(b.modules) if b.checkpointed else 0
            uses.append(Use(b, last, "backward", encloses=n))
            uses += [Use(b, m, "recompute") for m in range(n)]
            uses += [Use(b, m, "backward") for m in reversed(range(last))]
        return uses

    def head_chunk_backward(heads, backward):
        """A chunk's recomputation of its heads, then their backwards. As measured (DeepSpeed 0.19.8), the
        teacher head, once gathered again for the recomputation, stays gathered through its backward in the
        switch branch, as if that backward enclosed the recomputation; the student head follows the release
        rule."""
        uses = [Use(b, m, "recompute") for b in heads for m in range(len(b.modules))] + backward
        if t is not None and switch:
            first = next(i for i, u in enumerate(uses) if u.block is t.head)
            last = next(i for i, u in enumerate(uses) if u.block is t.head and u.phase == "backward")
            uses[first] = Use(t.head, uses[first].module, "recompute", encloses=last - first)
        return uses

    s, t = student, teacher
    trace = fwd(*s.vision, s.projector, s.embed, *s.layers, s.norm)
    heads = (s.head,)
    if t is not None:
        trace += fwd(*t.vision, t.projector, t.embed, *t.layers, t.norm)
        if switch:
            trace += fwd(t.projector, t.embed, *t.layers, t.norm)
        heads = (s.head, t.head, t.head) if switch else (s.head, t.head)
    head_backward = bwd(t.head, s.head) if t is not None and switch else bwd(s.head)
    trace += fwd(*heads) * max(1, head_chunks)
    trace += head_chunk_backward(heads, head_backward) * head_chunks if head_chunks else head_backward
    if t is not None and switch:
        trace += bwd(t.norm, *reversed(t.layers), t.embed, t.projector)
    return trace + bwd(s.norm, *reversed(s.layers), s.embed, s.projector, *reversed(s.vision))


@dataclass(frozen=True)
class Layout:
    """How the run is laid out: ranks, ZeRO stage and its settings, element sizes."""
    world: int
    zero_stage: int
    grad_accum: int
    param_bytes: int  # 2 for bf16 / fp16, 4 for fp32
    grad_bytes: int
    persistence_threshold: int = 100_000  # stage3_param_persistence_threshold
    reuse_distance: int = 1_000_000_000  # stage3_max_reuse_distance
    hpz: int = 1  # zero_hpz_partition_size: ranks of one secondary partition (ZeRO++ hpZ)
    # Chunks of rows the loss head runs in per micro-step (0: unchunked): ceil(most rows on a rank / chunk_rows).
    head_chunks: int = 1

    @classmethod
    def from_ds_config(cls, ds: dict, world: int, head_chunks: int = 1):
        zero = ds.get("zero_optimization", {})
        size = 2 if ds.get("bf16", {}).get("enabled") is True or ds.get("fp16", {}).get("enabled") is True else 4
        return cls(world=world, zero_stage=zero.get("stage", 0), grad_accum=ds["gradient_accumulation_steps"],
                   param_bytes=size, grad_bytes=size,
                   persistence_threshold=int(zero.get("stage3_param_persistence_threshold", 100_000)),
                   reuse_distance=int(zero.get("stage3_max_reuse_distance", 1_000_000_000)),
                   hpz=int(zero.get("zero_hpz_partition_size", 1)), head_chunks=head_chunks)

    def partition(self, numel: int) -> int:
        """A rank's share of a parameter (ZeRO pads parameters to a multiple of the ranks)."""
        return -(-numel // self.world)


def gathers(trace: list[Use], layout: Layout) -> dict[str, list[int]]:
    """Element counts of the parameters all-gathered for one micro-step, by block, under ZeRO-3's release rule:
    after a module runs, its parameters stay gathered when their next use comes before reuse_distance elements
    of the trace have gone by, and while a backward that uses them is still running (a checkpointed layer's
    recomputation runs inside the backward of its last module). A frozen module's parameters recomputed inside
    such a backward are released with it, whatever comes next. Persistent (small) parameters are never gathered
    for a use."""
    held, out = set(), {}
    active: dict[tuple, int] = {}  # module -> trace index where the backward it runs inside ends
    forced: dict[int, list[tuple]] = {}  # trace index -> frozen recomputed modules released there
    enclosing_end = -1
    for i, use in enumerate(trace):
        if use.key not in held:
            gathered = [n for n in use.numels if n > layout.persistence_threshold]
            if gathered:
                out.setdefault(use.block.name, []).extend(gathered)
            held.add(use.key)
        decide = []
        if use.encloses:
            enclosing_end = active[use.key] = i + use.encloses
        elif use.key not in active:
            decide.append(use.key)
        if use.phase == "recompute" and not use.block.trainable and i <= enclosing_end:
            forced.setdefault(enclosing_end, []).append(use.key)
        decide += [key for key, end in active.items() if end == i]
        for key in decide:
            active.pop(key, None)
            if not _used_again_soon(trace, i, key, layout.reuse_distance):
                held.discard(key)
        held.difference_update(forced.pop(i, []))
    return out


def _used_again_soon(trace: list[Use], i: int, key: tuple, reuse_distance: int) -> bool:
    traversed = 0
    for later in trace[i + 1:]:
        if traversed >= reuse_distance:
            return False
        if later.key == key:
            return True
        traversed += sum(later.numels)
    return False


def _in_zero(teacher: VLMBlocks | None, placement: str) -> VLMBlocks | None:
    return teacher if placement == "sharded" else None  # a replicated teacher is outside ZeRO


def gathered_per_step(student: VLMBlocks, teacher: VLMBlocks | None, layout: Layout, *, switch: bool,
                      placement: str) -> dict[str, list[int]]:
    """ZeRO-3: the element counts of every parameter all-gathered in one optimizer step, by block: grad_accum
    micro-steps of gathers for the passes, then the refresh of the persistent parameters after the step."""
    held_by_zero = _in_zero(teacher, placement)
    out = {}
    for name, numels in gathers(micro_step_trace(student, held_by_zero, switch=switch,
                                                     head_chunks=layout.head_chunks), layout).items():
        out[name] = numels * layout.grad_accum
    for blocks in (student, held_by_zero):
        for block in blocks.all() if blocks is not None else ():
            out.setdefault(block.name, []).extend(n for n in block.numels if n <= layout.persistence_threshold)
    return out


def predict_step(student: VLMBlocks, teacher: VLMBlocks | None, layout: Layout, *, switch: bool,
                 placement: str) -> dict[str, int]:
    """Bytes per rank per optimizer step, by collective, as DeepSpeed's comms logger counts them (without the
    few scalar all-reduces of the gradient norm), for the steps after the first. teacher: None for plain SFT;
    switch: the VSD pass runs; placement: sharded | replicated (recipe.config.TeacherPlacement)."""
    grads = sum(layout.partition(n) * layout.world for b in student.all() if b.trainable and b.backward
                for n in b.numels)
    if layout.zero_stage == 2:
        trainable = sum(n for b in student.all() if b.trainable for n in b.numels)
        return {"all_reduce": layout.grad_accum * grads * layout.grad_bytes,
                "all_gather_into_tensor": layout.partition(trainable) * layout.param_bytes}
    numels = gathered_per_step(student, teacher, layout, switch=switch, placement=placement).values()
    return {"all_gather_into_tensor": sum(layout.partition(n) for ns in numels for n in ns) * layout.param_bytes,
            "reduce_scatter_tensor": layout.grad_accum * grads * layout.grad_bytes}


def size(nbytes: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes:.0f} B"


def placement_summary(student: VLMBlocks, teacher: VLMBlocks, layout: Layout, *, switch: bool,
                      placement: str) -> str:
    """The start-up line: where the teacher lives, its memory per GPU, and the parameter bytes all-gathered per
    step for this placement (the gathered sizes; each rank receives (ranks - 1) / ranks of them)."""
    numels = [n for block in teacher.all() for n in block.numels]
    whole = sum(numels) * layout.param_bytes
    if layout.zero_stage == 2:
        return (f"teacher whole on every GPU (ZeRO-2 partitions no parameters): {size(whole)} per GPU; "
                f"no parameter gathers")
    gathered = gathered_per_step(student, teacher, layout, switch=switch, placement=placement)
    by_role = {role: sum(n for name, ns in gathered.items() if name.startswith(role) for n in ns) * layout.param_bytes
               for role in ("teacher", "student")}
    gathers_line = (f"parameter all-gathers per step: teacher {size(by_role['teacher'])}, student "
                    f"{size(by_role['student'])} (recipe/comms.py)")
    if placement == "replicated":
        return f"teacher replicated, outside ZeRO: {size(whole)} per GPU; {gathers_line}"
    held = sum(n if n <= layout.persistence_threshold else layout.partition(n) for n in numels)
    if layout.hpz > 1:  # ZeRO++ hpZ: a secondary partition of every parameter within each node
        held += sum(-(-n // layout.hpz) for n in numels if n > layout.persistence_threshold)
    return (f"teacher sharded by ZeRO-3 over {layout.world} ranks"
            + (f" (hpZ: a second copy over each {layout.hpz} ranks)" if layout.hpz > 1 else "")
            + f": {size(held * layout.param_bytes)} of its {size(whole)} per GPU; {gathers_line}")


# ---------------------------------------------------------------------------------------------------
# Predicted step times beyond one node (docs/scaling.md)
#
#     python -m recipe.comms [--pair tinyllava 7b-2b] [--gpus 8 64 512] [--checkpointing]

NVLINK = 900e9  # bytes/s per GPU inside a node
NETWORK = 400e9 / 8  # bytes/s per GPU between nodes (400 Gb/s)
GPUS_PER_NODE = 8
# Measured on one H200 (docs/method.md's performance contract; recipe/configs/tinyllava_3b_to_0p5b.yaml's pair, random
# init, micro-batch 8 x 1049 tokens, bf16, SDPA): a straightforward Switch-KD step and a plain SFT step.
MEASURED_KD_S, MEASURED_SFT_S = 0.783, 0.210
SUPERVISED_ROWS, CHUNK_ROWS = 1272, 512  # that micro-batch's supervised rows; loss.chunk_rows' default
SIGLIP_SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                     image_size=384, patch_size=14, vision_use_head=False)  # no pooling head, as TinyLLaVA
QWEN = {  # the language models' shapes (untied LM heads, as in the measured pair)
    "Qwen2-0.5B": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                       intermediate_size=4864, vocab_size=151936),
    "Qwen2.5-1.5B": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         intermediate_size=8960, vocab_size=151936),
    "Qwen2.5-3B": dict(hidden_size=2048, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
                       intermediate_size=11008, vocab_size=151936),
    "Qwen2.5-7B": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       intermediate_size=18944, vocab_size=152064),
}
PAIRS = {"tinyllava": ("Qwen2-0.5B", "Qwen2.5-3B"), "7b-2b": ("Qwen2.5-1.5B", "Qwen2.5-7B")}  # (student, teacher)


def meta_vlm(language: str):
    """A SigLIP-so400m + `language` Llava VLM on the meta device: shapes only, no memory, no download."""
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration, Qwen2Config, SiglipVisionConfig

    config = LlavaConfig(vision_config=SiglipVisionConfig(**SIGLIP_SO400M),
                         text_config=Qwen2Config(tie_word_embeddings=False, **QWEN[language]),
                         vision_feature_layer=-2, vision_feature_select_strategy="full", image_token_id=151646)
    with torch.device("meta"):
        return LlavaForConditionalGeneration(config)


@dataclass(frozen=True)
class Plan:
    name: str
    zero_stage: int
    placement: str
    hpz: int = 1


PLANS = (Plan("ZeRO-3, teacher sharded", 3, "sharded"), Plan("ZeRO-3 + hpZ (8), teacher sharded", 3, "sharded", 8),
         Plan("ZeRO-3, teacher replicated", 3, "replicated"), Plan("ZeRO-2 (teacher whole)", 2, "replicated"))


def traffic(student: VLMBlocks, teacher: VLMBlocks, gpus: int, plan: Plan) -> dict[str, float]:
    """Bytes each GPU receives per optimizer step (grad_accum 1, bf16), over NVLink and over the network."""
    layout = Layout(world=gpus, zero_stage=plan.zero_stage, grad_accum=1, param_bytes=2, grad_bytes=2, hpz=plan.hpz,
                    head_chunks=-(-SUPERVISED_ROWS // CHUNK_ROWS))
    spread = (gpus - 1) / gpus
    grads = sum(n for b in student.all() if b.trainable and b.backward for n in b.numels) * 2
    if plan.zero_stage == 2:  # all-reduce of the gradients, all-gather of the updated student
        moved = {"gradients": 2 * spread * grads, "gathers": spread * student.numel() * 2, "nvlink": 0.0,
                 "network": 0.0}
        moved["network" if gpus > GPUS_PER_NODE else "nvlink"] = moved["gradients"] + moved["gathers"]
        return moved
    gathered = gathered_per_step(student, teacher, layout, switch=True, placement=plan.placement)
    by_role = {role: sum(n for name, ns in gathered.items() if name.startswith(role) for n in ns) * 2
               for role in ("student", "teacher")}
    out = {"gradients": spread * grads, "gathers": spread * sum(by_role.values()), "nvlink": 0.0, "network": 0.0}
    over_network = gpus > GPUS_PER_NODE
    if plan.hpz > 1 and over_network:
        # Each parameter's first gather of a step comes from the primary partition (all GPUs); the rest from the
        # secondary one inside the node. A frozen teacher's secondary partition never expires.
        first = sum(n for b in student.all() for n in b.numels if n > layout.persistence_threshold) * 2
        out["network"] += spread * first + out["gradients"]
        out["nvlink"] += (by_role["student"] - first + by_role["teacher"]) * (plan.hpz - 1) / plan.hpz
    else:
        out["network" if over_network else "nvlink"] += out["gathers"] + out["gradients"]
    return out


def teacher_memory(teacher: VLMBlocks, gpus: int, plan: Plan) -> float:
    """The teacher's bf16 bytes held by each GPU."""
    if plan.zero_stage == 2 or plan.placement == "replicated":
        return 2 * teacher.numel()
    secondary = -(-teacher.numel() // plan.hpz) if plan.hpz > 1 else 0
    return 2 * (-(-teacher.numel() // gpus) + secondary)


def predict_rows(pair: str, gpus_list, checkpointing: bool = False) -> list[dict]:
    student_lm, teacher_lm = PAIRS[pair]
    student_vlm, teacher_vlm = meta_vlm(student_lm), meta_vlm(teacher_lm)
    student = vlm_blocks(student_vlm, trainable=True, checkpointing=checkpointing)
    teacher = vlm_blocks(teacher_vlm, trainable=False, checkpointing=checkpointing)
    tiny_s, tiny_t = (vlm_blocks(meta_vlm(name), trainable=name == PAIRS["tinyllava"][0], checkpointing=False).numel()
                      for name in PAIRS["tinyllava"])
    # Compute per micro-batch of 8 x 1049 tokens: the measured pair's, scaled by parameters for another pair
    # (student part: the SFT step; teacher part: the rest of the Switch-KD step).
    compute = MEASURED_SFT_S * student.numel() / tiny_s + (MEASURED_KD_S - MEASURED_SFT_S) * teacher.numel() / tiny_t
    rows = []
    for gpus in gpus_list:
        for plan in PLANS:
            moved = traffic(student, teacher, gpus, plan)
            comm = moved["nvlink"] / NVLINK + moved["network"] / NETWORK
            rows.append({"pair": pair, "gpus": gpus, "plan": plan.name, "compute_s": compute, "comm_s": comm,
                         "gathers_GB": moved["gathers"] / 1e9, "gradients_GB": moved["gradients"] / 1e9,
                         "teacher_GB_per_gpu": teacher_memory(teacher, gpus, plan) / 1e9,
                         "step_overlapped_s": max(compute, comm), "step_serial_s": compute + comm,
                         "dominates": ("communication" if comm > compute else "compute" if comm < 0.2 * compute
                                       else "compute (communication close behind)"),
                         "params_B": (student.numel() / 1e9, teacher.numel() / 1e9)})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| GPUs | plan | teacher GB / GPU | gathers GB / GPU | gradients GB / GPU | comm s | comm / compute | "
             "step s (overlapped - serial) | dominates |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['gpus']} | {r['plan']} | {r['teacher_GB_per_gpu']:.2f} | {r['gathers_GB']:.1f} | "
                     f"{r['gradients_GB']:.1f} | {r['comm_s']:.3f} | {r['comm_s'] / r['compute_s']:.2f} | "
                     f"{r['step_overlapped_s']:.2f} - {r['step_serial_s']:.2f} | {r['dominates']} |")
    return "\n".join(lines)


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(description="Predicted Switch-KD step times beyond one node (docs/scaling.md)")
    parser.add_argument("--pair", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    parser.add_argument("--gpus", nargs="+", type=int, default=[8, 64, 512])
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing of both models")
    args = parser.parse_args(argv)
    for pair in args.pair:
        rows = predict_rows(pair, args.gpus, args.checkpointing)
        s, t = rows[0]["params_B"]
        print(f"\n{pair}: student {PAIRS[pair][0]} + SigLIP-so400m ({s:.2f}B), teacher {PAIRS[pair][1]} + "
              f"SigLIP-so400m ({t:.2f}B); micro-batch 8 x 1049 tokens per GPU, grad_accum 1, bf16, "
              f"gradient checkpointing {'on' if args.checkpointing else 'off'}; compute {rows[0]['compute_s']:.3f} s "
              f"per step\n")
        print(markdown(rows))


if __name__ == "__main__":
    main()
