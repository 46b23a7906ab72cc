"""The loss head: the LM heads, CE and both divergences over the supervised rows, a chunk of rows at a time.

Unchunked (`loss.chunk_rows: 0`), the three (rows x V) logit tensors, and what CE and the divergences keep of
them for the backward, live from the forward until the backward has used them: memory that grows with the
rows of the micro-batch. Chunked, each chunk of rows runs under a non-reentrant torch.utils.checkpoint: the
forward keeps only the chunk's hidden states (views of the passes' outputs) and three sums; the backward
recomputes one chunk's logits, backpropagates through them (into the hidden states and the student's LM-head
weight, whose gradient accumulates over the chunks) and frees them before the next chunk. Peak memory then
grows with chunk_rows, not with the rows; the price is a second forward of the heads and of the divergence.

Liger-Kernel's fused linear losses follow the same chunk pattern but compute the gradients in the forward.
Recomputing instead keeps the heads as module calls, which ZeRO-3 needs: it gathers a partitioned weight in
the module's forward (and for its backward), collectively, so every rank must call each head the same number
of times. Under ZeRO-3 the number of chunks therefore comes from the largest row count of any rank (one small
all-reduce per micro-step); a rank with fewer rows runs empty chunks.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from recipe.losses.divergence import divergence


@dataclass
class LossSums:
    """Sums over the rows of one micro-batch (means come from dividing by the row counts)."""
    ce: torch.Tensor  # over all supervised rows
    align: torch.Tensor  # over all supervised rows (0 without the term)
    vsd: torch.Tensor  # over the switch rows (0 without the term)
    rows: int
    vsd_rows: int


def chunk_sizes(rows: int, chunk_rows: int, most_rows: int | None = None) -> list[int]:
    """Row counts of consecutive chunks: chunk_rows each, the last one smaller; chunk_rows = 0: one chunk.
    most_rows (>= rows): size the list for that many rows, the chunks past `rows` empty."""
    most_rows = rows if most_rows is None else most_rows
    if chunk_rows == 0:
        return [rows]
    count = max(1, -(-most_rows // chunk_rows))
    return [min(chunk_rows, max(0, rows - i * chunk_rows)) for i in range(count)]


def loss_sums(passes, cfg) -> LossSums:
    """CE, D(z_T, z_S) and D(z_T, z_SW) summed over the rows of `passes` (recipe.models.PassOutputs), in
    chunks of cfg.chunk_rows rows (0: at once). The divergences see the first passes.vocab logits, CE the
    student's whole table."""
    rows = passes.student_hidden.shape[0]
    with_align = passes.teacher_hidden is not None and cfg.align_weight > 0
    with_vsd = passes.teacher_hidden is not None and passes.switch_hidden is not None and cfg.vsd_weight > 0
    sizes = chunk_sizes(rows, cfg.chunk_rows, _most_rows_on_any_rank(rows, passes))
    students, targets = passes.student_hidden.split(sizes), passes.targets.split(sizes)
    teachers = passes.teacher_hidden.split(sizes) if with_align or with_vsd else [None] * len(sizes)
    masks = switches = [None] * len(sizes)
    vsd_rows = 0
    if with_vsd:
        masks = passes.switch_rows.split(sizes)
        switch_sizes = torch.stack([mask.sum() for mask in masks]).tolist()  # one device sync
        switches = passes.switch_hidden.split(switch_sizes)
        vsd_rows = passes.switch_hidden.shape[0]
    total = passes.student_hidden.new_zeros(3, dtype=torch.float32)
    for student, target, teacher, mask, switch in zip(students, targets, teachers, masks, switches):
        sums = functools.partial(_chunk_sums, passes, cfg, with_align, target, mask)
        if cfg.chunk_rows:
            # No randomness in the heads or the losses: the recomputation needs no saved RNG state.
            total = total + checkpoint(sums, student, teacher, switch, use_reentrant=False, preserve_rng_state=False)
        else:
            total = total + sums(student, teacher, switch)
    ce, align, vsd = total.unbind()
    return LossSums(ce=ce, align=align, vsd=vsd, rows=rows, vsd_rows=vsd_rows)


def _chunk_sums(passes, cfg, with_align: bool, targets, switch_mask, student_hidden, teacher_hidden,
                switch_hidden) -> torch.Tensor:
    """(CE, alignment, VSD) sums over one chunk of rows, as a float32 tensor of 3."""
    shared = slice(0, passes.vocab)  # the id range the two models' logits are compared over
    student = passes.student_head(student_hidden)
    ce = F.cross_entropy(student.float(), targets, reduction="sum")
    align = vsd = ce.new_zeros(())
    if teacher_hidden is not None:
        with torch.no_grad():
            teacher = passes.teacher_head(teacher_hidden)[:, shared]
        if with_align:
            align = _divergence_sum(teacher, student[:, shared], cfg)
        if switch_hidden is not None:
            vsd = _divergence_sum(teacher[switch_mask], passes.teacher_head(switch_hidden)[:, shared], cfg)
    sums = torch.stack([ce, align, vsd])
    # Checkpointed, the backward recomputes the chunk when it first unpacks a tensor the chunk saved. This
    # product saves its constant operand, so that happens at the chunk's first backward node on every rank,
    # whatever its rows; otherwise an empty chunk (which saves less) recomputes later than a full one, and
    # ZeRO-3's gathers of the two heads (in the recomputation and for their backward) come in another order.
    return sums * torch.ones_like(sums)


def _divergence_sum(ref: torch.Tensor, trainee: torch.Tensor, cfg) -> torch.Tensor:
    """The divergence's mean times the rows. No rows: 0, still tied to the head's output, so that the head's
    backward runs on every rank (ZeRO-3's collectives)."""
    if trainee.shape[0] == 0:
        return trainee.sum().float() * 0.0
    return divergence(ref, trainee, cfg).float() * trainee.shape[0]


def _most_rows_on_any_rank(rows: int, passes) -> int:
    """The largest row count over the ranks when ZeRO-3 partitions a head (its calls must match across
    ranks); this rank's rows otherwise."""
    heads = [passes.student_head, passes.teacher_head]
    partitioned = any(hasattr(p, "ds_id") for head in heads if head is not None for p in head.parameters())
    if not (partitioned and dist.is_initialized() and dist.get_world_size() > 1):
        return rows
    most = torch.tensor([rows], device=passes.student_hidden.device)
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    return int(most.item())
