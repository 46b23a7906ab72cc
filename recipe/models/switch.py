"""The three forward passes of Switch-KD (docs/method.md, "The three passes"), for every model family
(recipe/models/families: where E ends and P begins, how image embeddings enter L).

    teacher pass  z_T  = L_T(P_T(E_T(image)), text)   no_grad, once per micro-step, reused by both losses
    student pass  z_S  = L_S(P_S(E_S(image)), text)
    switch pass   z_SW = L_T(P_T(E_S(image)), text)   gradients reach E_S only

The passes end at the language models' last hidden states, gathered at the supervised positions; the loss
(recipe/losses/objective.py) applies the LM heads, so no (batch x sequence x vocab) tensor is ever built.
Every submodule is called through its forward (never through its .weight) so that ZeRO-3 gathers
partitioned parameters on the way.
"""
from __future__ import annotations

import contextlib
import inspect
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from recipe.losses.objective import switch_kd_objective
from recipe.models.families import family_of, language_hidden


def supervised_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sample, position) of each supervised prediction after the causal shift, and its target token.

    Rows come in (sample, position) order, so the i-th row of every pass is the i-th supervised token.
    """
    sample, position = torch.nonzero(labels[:, 1:] != -100, as_tuple=True)
    return sample, position, labels[sample, position + 1]


def enable_switch_checkpointing(language_model: nn.Module) -> bool:
    """Checkpoint the teacher's decoder layers in the switch pass, which backpropagates to E_S through the
    whole teacher language model: without it that pass keeps every layer's activations for the backward
    (tests/perf/README.md has the measured sizes). The teacher pass runs under no_grad and is not affected.
    Returns False, with a warning, for decoder layers that read their own training flag (their output would
    change with it; see `frozen_layers_checkpointing`). language_model: the teacher's L decoder
    (Family.language_model)."""
    layers = [m for m in language_model.modules() if isinstance(m, GradientCheckpointingLayer)]
    unsafe = sorted({type(m).__name__ for m in layers if _reads_training_flag(type(m))})
    if not layers or unsafe:
        warnings.warn("gradient_checkpointing: the teacher's switch pass keeps its activations "
                      + (f"({', '.join(unsafe)} reads its training flag)" if unsafe else "(no checkpointable layers)"),
                      stacklevel=2)
        return False
    language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # transformers also makes the frozen embedding's output require grad (for reentrant checkpointing): a
    # backward through the teacher's embedding table that computes nothing, and under ZeRO-3 one more
    # gather of it per micro-step (recipe/comms.py). Non-reentrant checkpointing does not need it.
    language_model.disable_input_require_grads()
    return True


def _reads_training_flag(layer_class) -> bool:
    try:
        return "self.training" in inspect.getsource(layer_class.forward)
    except (OSError, TypeError):
        return True  # source unavailable: assume the worst


@contextlib.contextmanager
def frozen_layers_checkpointing(module: nn.Module):
    """Let the checkpointing-enabled layers of a frozen, eval-mode module checkpoint during one pass.

    transformers checkpoints a layer only while the layer itself is in training mode. Only the layer
    objects' own flag is raised here: their submodules (attention, MLP, any dropout) stay in eval mode,
    so the pass and its recomputation in the backward compute exactly what the eval-mode pass computes.
    """
    layers = [m for m in module.modules()
              if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing and not m.training]
    for layer in layers:
        layer.training = True
    try:
        yield
    finally:
        for layer in layers:
            layer.training = False


@dataclass
class PassOutputs:
    """The passes' last hidden states at the supervised rows, and the LM heads that make them logits.

    Rows are supervised tokens in (sample, position) order; the switch pass has the rows of image samples.
    """
    student_hidden: torch.Tensor  # (rows, H_S): z_S = student_head(student_hidden)
    targets: torch.Tensor  # (rows,)
    student_head: nn.Module
    teacher_hidden: torch.Tensor | None = None  # (rows, H_T), no grad: z_T = teacher_head(teacher_hidden)
    switch_hidden: torch.Tensor | None = None  # (switch rows, H_T): z_SW = teacher_head(switch_hidden)
    switch_rows: torch.Tensor | None = None  # (rows,) bool: the rows of image samples, i.e. the rows of z_SW
    teacher_head: nn.Module | None = None
    anchor: torch.Tensor | None = None  # 0-valued term tying a stand-in image's passes into the backward
    # The divergences compare the first `vocab` logits only: the id range both tokenizers map identically,
    # when one table has padding rows or trailing added tokens (docs/method.md, "The three passes").
    # None: the whole (equal-sized) tables. CE always sees the student's whole table.
    vocab: int | None = None

    def student_logits(self) -> torch.Tensor:
        return self.student_head(self.student_hidden)

    def teacher_logits(self) -> torch.Tensor:
        with torch.no_grad():
            return self.teacher_head(self.teacher_hidden)

    def switch_logits(self) -> torch.Tensor:
        return self.teacher_head(self.switch_hidden)


def stand_in_images(vlm) -> dict:
    """One black image for micro-batches without images.

    ZeRO-3 gathers parameters module by module, collectively, in forward and backward: every rank must
    run the same modules every micro-step. So a batch without images still runs the vision path on this
    image, and its output enters the loss multiplied by zero (as LLaVA does for text-only batches).
    """
    return family_of(vlm).stand_in_images(vlm)


def batch_images(batch: dict, family, prefix: str = "") -> dict:
    """The batch's image tensors for one model (prefix "teacher_": the teacher's own preprocessing)."""
    return {key: batch[prefix + key] for key in family.image_keys}


def run_passes(student, teacher, batch: dict, *, with_switch: bool = True, vocab: int | None = None) -> PassOutputs:
    """Teacher (cached), student and switch passes of one micro-batch.

    batch: input_ids, attention_mask, labels (B, T); the image tensors of the samples whose has_image (B,) is
    set, in batch order, under the family's image_keys (pixel_values, and e.g. image_grid_thw); the same
    keys prefixed "teacher_", when present, are the images as the teacher preprocesses them (E_T's input;
    otherwise E_T takes the student's). Text-only samples get no switch pass. vocab: the shared vocabulary
    the divergences compare (PassOutputs.vocab), from the pair check.
    """
    input_ids, attention_mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    has_image = batch["has_image"]
    family = family_of(student)
    sample, position, targets = supervised_positions(labels)
    stand_in = not bool(has_image.any())
    images = stand_in_images(student) if stand_in else batch_images(batch, family)

    # E_S runs once; its features feed both P_S (student pass) and P_T (switch pass).
    student_vision = family.encode_images(student, images)
    student_hidden = language_hidden(student, input_ids, attention_mask, None if stand_in else student_vision.embeds,
                                     images, "student pass")
    out = PassOutputs(student_hidden=student_hidden[sample, position], targets=targets, student_head=student.lm_head)
    if stand_in:
        out.anchor = student_vision.embeds.sum() * 0.0
    if teacher is None:
        return out
    out.vocab = vocab

    if stand_in:
        teacher_images = stand_in_images(teacher)
    elif "teacher_" + family.image_keys[0] in batch:
        teacher_images = batch_images(batch, family, "teacher_")
    else:
        teacher_images = images
    with torch.no_grad():
        teacher_embeds = family.encode_images(teacher, teacher_images).embeds
        teacher_hidden = language_hidden(teacher, input_ids, attention_mask, None if stand_in else teacher_embeds,
                                         teacher_images, "teacher pass")
        out.teacher_hidden = teacher_hidden[sample, position]
    out.teacher_head = teacher.lm_head

    if with_switch:
        switch_embeds = family.project(teacher, student_vision.features, images)
        rows = has_image[sample]
        with frozen_layers_checkpointing(family.language_model(teacher)):  # no-op unless enable_switch_checkpointing
            if stand_in:  # the stand-in image alone, as a sequence of image tokens; no supervised rows
                image_ids = torch.full((1, switch_embeds.shape[0]), teacher.config.image_token_id,
                                       device=input_ids.device)
                switch_hidden = language_hidden(teacher, image_ids, torch.ones_like(image_ids), switch_embeds, images,
                                                "switch pass")
                out.anchor = out.anchor + switch_hidden.sum() * 0.0
                sub_sample = sub_position = sample[:0]
            else:
                switch_hidden = language_hidden(teacher, input_ids[has_image], attention_mask[has_image],
                                                switch_embeds, images, "switch pass")
                # Sample indices inside the image-only sub-batch, for the same rows in the same order.
                sub_sample, sub_position = (torch.cumsum(has_image.long(), 0) - 1)[sample[rows]], position[rows]
        out.switch_hidden = switch_hidden[sub_sample, sub_position]
        out.switch_rows = rows
    return out


class SwitchKDModel(nn.Module):
    """What the DeepSpeed engine wraps: the trainable student and the frozen teacher (or no teacher: SFT).

    forward(batch) -> dict of loss terms; "loss" is the weighted objective to backpropagate. shared_vocab (the
    pair check's PairCheck.shared_vocab) is None when both tables have the same size.

    teacher_placement (docs/scaling.md): "sharded" registers the teacher as a submodule, so the engine holds
    it like the student (under ZeRO-3: partitioned, gathered for each pass). "replicated" holds it outside
    the module tree: the engine never sees it (no partitioning, no gather hooks, not moved or cast; the
    caller puts it on the device), while the switch pass still backpropagates through it into E_S.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module | None, loss_config, shared_vocab: int | None = None,
                 *, teacher_placement: str = "sharded"):
        super().__init__()
        self.student = student
        if teacher_placement == "replicated":
            self.__dict__["teacher"] = teacher  # a plain attribute: nn.Module registration skipped
        else:
            self.teacher = teacher
        self.loss_config = loss_config
        self.shared_vocab = shared_vocab  # the pair check's: the divergences compare the first shared_vocab logits
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # frozen: never dropout, whatever the engine asks
        return self

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        cfg = self.loss_config
        teacher = self.teacher if (cfg.align_weight > 0 or cfg.vsd_weight > 0) else None
        passes = run_passes(self.student, teacher, batch, with_switch=cfg.vsd_weight > 0, vocab=self.shared_vocab)
        return switch_kd_objective(passes, cfg)
