"""The three passes on tiny real checkpoints: correctness against HF's own forward, gradient routing,
the teacher cache, the pairing check and the no-(B x T x V) rule."""
import copy
import importlib.util
import os
import shutil

import pytest
import torch
from transformers import AutoConfig

from recipe.config import LossConfig
from recipe.data import Collator, ShardDataset
from recipe.losses.objective import switch_kd_objective
from recipe.models import (
    IncompatiblePair,
    SwitchKDModel,
    check_pair,
    enable_switch_checkpointing,
    image_token_count,
    load_image_processor,
    load_tokenizer,
    load_vlm,
    pick_attention,
    run_passes,
    same_preprocessing,
    supervised_positions,
)


@pytest.fixture(scope="module")
def pair(demo_assets):
    torch.manual_seed(0)
    return load_vlm(demo_assets["student"]), load_vlm(demo_assets["teacher"])


@pytest.fixture(scope="module")
def mixed_batch(demo_assets, pair):
    """Image and text-only samples of different lengths, collated exactly as in training."""
    student, _ = pair
    dataset = ShardDataset(demo_assets["train"])
    images = [i for i in range(len(dataset)) if dataset.meta(i).get("image")][:3]
    texts = [i for i in range(len(dataset)) if not dataset.meta(i).get("image")][:2]
    collator = Collator(load_tokenizer(demo_assets["student"]), load_image_processor(demo_assets["student"]),
                        num_image_tokens=image_token_count(student.config),
                        image_token_id=student.config.image_token_id, max_length=256)
    batch = collator([dataset[i] for i in [images[0], texts[0], images[1], texts[1], images[2]]])
    assert batch["has_image"].tolist() == [True, False, True, False, True]
    assert len(set(batch["attention_mask"].sum(1).tolist())) > 1, "want samples of different lengths"
    return batch


def grad_total(module):
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


def student_parts(student):
    return {"vision": student.model.vision_tower, "projector": student.model.multi_modal_projector,
            "language": torch.nn.ModuleList([student.model.language_model, student.lm_head])}


def loss_grads(pair, batch, **weights):
    student, teacher = copy.deepcopy(pair[0]), copy.deepcopy(pair[1])
    model = SwitchKDModel(student, teacher, LossConfig(candidates=16, impl="torch", **weights))
    out = model(batch)
    out["loss"].backward()
    return out, {name: grad_total(part) for name, part in student_parts(student).items()}, grad_total(teacher)


def test_teacher_pass_matches_hf_forward_at_supervised_positions(pair, mixed_batch):
    student, teacher = pair
    passes = run_passes(student, teacher, mixed_batch)
    with torch.no_grad():
        full = teacher(input_ids=mixed_batch["input_ids"], attention_mask=mixed_batch["attention_mask"],
                       pixel_values=mixed_batch["pixel_values"]).logits
    sample, position, targets = supervised_positions(mixed_batch["labels"])
    assert torch.allclose(passes.teacher_logits(), full[sample, position], atol=1e-4)
    assert torch.equal(passes.targets, mixed_batch["labels"][sample, position + 1])


def test_a_teacher_that_preprocesses_differently_sees_its_own_pixel_values(demo_assets, pair):
    """docs/method.md: the teacher pass takes E_T(image_T). A teacher with other normalisation gets its own pixels."""
    student, teacher = pair
    student_processor = load_image_processor(demo_assets["student"])
    teacher_processor = copy.deepcopy(student_processor)
    assert same_preprocessing(teacher_processor, student_processor)
    teacher_processor.image_mean, teacher_processor.image_std = [0.4, 0.45, 0.5], [0.25, 0.26, 0.27]
    assert not same_preprocessing(teacher_processor, student_processor)
    dataset = ShardDataset(demo_assets["train"])
    images = [i for i in range(len(dataset)) if dataset.meta(i).get("image")][:2]
    text = [i for i in range(len(dataset)) if not dataset.meta(i).get("image")][:1]
    collator = Collator(load_tokenizer(demo_assets["student"]), student_processor,
                        num_image_tokens=image_token_count(student.config),
                        image_token_id=student.config.image_token_id,
                        max_length=256, teacher_image_processor=teacher_processor)
    batch = collator([dataset[i] for i in images + text])
    assert batch["teacher_pixel_values"].shape == batch["pixel_values"].shape
    assert not torch.allclose(batch["teacher_pixel_values"], batch["pixel_values"])

    passes = run_passes(student, teacher, batch)
    sample, position, _ = supervised_positions(batch["labels"])
    with torch.no_grad():
        own, shared = (teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               pixel_values=batch[key]).logits[sample, position]
                       for key in ("teacher_pixel_values", "pixel_values"))
    teacher_logits = passes.teacher_logits()
    assert torch.allclose(teacher_logits, own, atol=1e-4) and not torch.allclose(teacher_logits, shared, atol=1e-3)
    # The switch pass still runs on the student's own features (E_S(image_S)).
    student_pixels_only = {k: v for k, v in batch.items() if k != "teacher_pixel_values"}
    assert torch.equal(run_passes(student, teacher, student_pixels_only).switch_logits(), passes.switch_logits())
    # A text-only micro-batch (the stand-in image path) works with the teacher's empty pixel values too.
    text_only = collator([dataset[i] for i in text])
    assert text_only["teacher_pixel_values"].shape[0] == 0
    assert run_passes(student, teacher, text_only).teacher_logits().shape[0] > 0


def test_switch_pass_equals_teacher_pass_when_student_vision_is_the_teachers(pair, mixed_batch):
    student, teacher = copy.deepcopy(pair[0]), pair[1]
    student.model.vision_tower.load_state_dict(teacher.model.vision_tower.state_dict())
    passes = run_passes(student, teacher, mixed_batch)
    assert passes.switch_logits().shape[0] == int(passes.switch_rows.sum()) > 0
    assert torch.allclose(passes.switch_logits(), passes.teacher_logits()[passes.switch_rows], atol=1e-5)
    # With its own vision tower the student's features do change the teacher's output.
    other = run_passes(pair[0], teacher, mixed_batch)
    assert not torch.allclose(other.switch_logits(), other.teacher_logits()[other.switch_rows], atol=1e-3)


def test_vsd_alone_trains_only_the_student_vision_tower(pair, mixed_batch):
    out, grads, teacher_grad = loss_grads(pair, mixed_batch, ce_weight=0.0, align_weight=0.0, vsd_weight=1.0)
    assert out["vsd"] > 0
    assert grads["vision"] > 0
    assert grads["projector"] == 0 and grads["language"] == 0
    assert teacher_grad == 0


def test_align_alone_reaches_all_three_student_parts(pair, mixed_batch):
    out, grads, teacher_grad = loss_grads(pair, mixed_batch, ce_weight=0.0, align_weight=1.0, vsd_weight=0.0)
    assert out["align"] > 0
    assert grads["vision"] > 0 and grads["projector"] > 0 and grads["language"] > 0
    assert teacher_grad == 0


def test_text_only_batch_gives_no_vsd(pair, mixed_batch):
    text_rows = ~mixed_batch["has_image"]
    batch = {k: (v[text_rows] if torch.is_tensor(v) and k != "pixel_values" else v) for k, v in mixed_batch.items()}
    batch["pixel_values"] = mixed_batch["pixel_values"][:0]
    out, grads, _ = loss_grads(pair, batch)
    assert out["vsd"] == 0 and out["vsd_rows"] == 0
    assert out["ce"] > 0 and out["align"] > 0
    assert grads["vision"] == 0 and grads["language"] > 0


def test_teacher_is_cached_and_logits_exist_only_at_supervised_rows(pair, mixed_batch):
    student, teacher = pair
    calls = {"teacher_vision": 0, "teacher_language": 0, "student_vision": 0}
    head_inputs = []

    def counter(name):
        return lambda *args: calls.__setitem__(name, calls[name] + 1)

    hooks = [
        teacher.model.vision_tower.register_forward_hook(counter("teacher_vision")),
        teacher.model.language_model.register_forward_hook(counter("teacher_language")),
        student.model.vision_tower.register_forward_hook(counter("student_vision")),
        student.lm_head.register_forward_hook(lambda m, i, o: head_inputs.append(i[0].shape)),
        teacher.lm_head.register_forward_hook(lambda m, i, o: head_inputs.append(i[0].shape)),
    ]
    try:
        out = SwitchKDModel(student, teacher, LossConfig(candidates=16, impl="torch"))(mixed_batch)
    finally:
        for h in hooks:
            h.remove()
    # Teacher pass once (cached for both losses) + switch pass once; E_S once for both of its uses.
    assert calls == {"teacher_vision": 1, "teacher_language": 2, "student_vision": 1}
    rows = int(out["rows"])
    assert rows == int((mixed_batch["labels"][:, 1:] != -100).sum())
    assert all(len(shape) == 2 for shape in head_inputs)  # (rows, hidden): never (batch, seq, hidden)
    assert [s[0] for s in head_inputs] == [rows, rows, int(out["vsd_rows"])]


def switch_step(student, teacher, batch) -> dict:
    """One VSD-only step: the switch logits, E_S's gradient, the bytes the teacher's language model saved
    for the backward (activations only, not its weights) and how often its layers ran in each direction."""
    language = teacher.model.language_model
    weights = {p.untyped_storage().data_ptr() for p in teacher.parameters()}
    saved, inside, layer_calls = {}, [False], [0]

    def pack(t):
        if inside[0] and t.untyped_storage().data_ptr() not in weights:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    hooks = [language.register_forward_pre_hook(lambda *a: inside.__setitem__(0, True)),
             language.register_forward_hook(lambda *a: inside.__setitem__(0, False))]
    # Pre-hooks: a recomputation stops as soon as it has rebuilt what the backward needs, before forward hooks.
    hooks += [layer.register_forward_pre_hook(lambda *a: layer_calls.__setitem__(0, layer_calls[0] + 1))
              for layer in language.layers]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            passes = run_passes(student, teacher, batch)
        forward_calls = layer_calls[0]
        student.zero_grad(set_to_none=True)
        loss_config = LossConfig(candidates=16, impl="torch", ce_weight=0.0, align_weight=0.0, vsd_weight=1.0)
        switch_kd_objective(passes, loss_config)["loss"].backward()
    finally:
        for h in hooks:
            h.remove()
    grad = torch.cat([p.grad.flatten() for p in student.model.vision_tower.parameters() if p.grad is not None])
    return {"switch": passes.switch_logits().detach(), "grad": grad, "saved_bytes": sum(saved.values()),
            "forward_calls": forward_calls, "backward_calls": layer_calls[0] - forward_calls}


def test_switch_checkpointing_recomputes_the_teacher_layers_and_changes_nothing_else(pair, mixed_batch):
    student, teacher = copy.deepcopy(pair[0]), copy.deepcopy(pair[1])
    teacher.requires_grad_(False).eval()
    plain = switch_step(student, teacher, mixed_batch)
    assert enable_switch_checkpointing(teacher.model.language_model)
    checkpointed = switch_step(student, teacher, mixed_batch)
    n_layers = len(teacher.model.language_model.layers)
    # Same logits and gradient to E_S, bit for bit: the layers' submodules never leave eval mode.
    assert torch.equal(plain["switch"], checkpointed["switch"]) and torch.equal(plain["grad"], checkpointed["grad"])
    assert plain["forward_calls"] == checkpointed["forward_calls"] == 2 * n_layers  # teacher + switch pass
    # Checkpointed, the switch pass's layers rerun in the backward and keep a fraction of the bytes.
    assert plain["backward_calls"] == 0 and checkpointed["backward_calls"] == n_layers
    assert checkpointed["saved_bytes"] * 4 < plain["saved_bytes"], (checkpointed, plain)
    assert not any(m.training for m in teacher.modules())


def test_switch_checkpointing_is_refused_for_layers_that_read_their_training_flag():
    from transformers import OPTConfig, OPTModel

    # OPT's decoder layer applies dropout with training=self.training in its own forward: raising the layer's
    # flag to checkpoint it would turn dropout on in the teacher.
    opt = OPTModel(OPTConfig(hidden_size=16, ffn_dim=32, num_hidden_layers=2, num_attention_heads=2, vocab_size=64,
                             word_embed_proj_dim=16))
    with pytest.warns(UserWarning, match="OPTDecoderLayer reads its training flag"):
        assert not enable_switch_checkpointing(opt)
    assert not any(getattr(m, "gradient_checkpointing", False) for m in opt.modules())


def test_pair_check_names_mismatched_vision_width_and_vocabulary(demo_assets):
    teacher_cfg = AutoConfig.from_pretrained(demo_assets["teacher"])
    student_cfg = AutoConfig.from_pretrained(demo_assets["student"])
    check_pair(teacher_cfg, student_cfg)  # the demo pair is compatible

    wide = copy.deepcopy(student_cfg)
    wide.vision_config.hidden_size = 96
    with pytest.raises(IncompatiblePair, match=r"vision feature width.*teacher 64 vs student 96"):
        check_pair(teacher_cfg, wide)

    other_vocab = copy.deepcopy(student_cfg)
    other_vocab.text_config.vocab_size += 7
    n = teacher_cfg.text_config.vocab_size
    with pytest.raises(IncompatiblePair, match=rf"vocabulary size: teacher {n} vs student {n + 7}"):
        check_pair(teacher_cfg, other_vocab)

    fewer_tokens = copy.deepcopy(student_cfg)
    fewer_tokens.vision_config.patch_size = 16
    with pytest.raises(IncompatiblePair, match="image tokens per image"):
        check_pair(teacher_cfg, fewer_tokens)


def test_a_checkpoint_without_tokenizer_is_named(tmp_path, demo_assets):
    shutil.copy(os.path.join(demo_assets["teacher"], "config.json"), tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match=f"no usable tokenizer in '{tmp_path}'"):
        load_tokenizer(str(tmp_path))


def test_auto_attention_takes_flash_attention_only_in_16_bit_on_cuda(monkeypatch):
    # As on a GPU node with flash-attn installed (this machine has neither): fp32 has no flash kernels.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name == "flash_attn" else None)
    assert [pick_attention("auto", p) for p in ("bf16", "fp16", "fp32")] == ["flash_attention_2"] * 2 + ["sdpa"]
    assert pick_attention("eager", "bf16") == "eager"


def test_pair_check_compares_tokenizers(demo_assets):
    tokenizer = load_tokenizer(demo_assets["student"])
    other = load_tokenizer(demo_assets["student"])
    other.add_tokens(["<extra_token>"])
    cfg = AutoConfig.from_pretrained(demo_assets["student"])
    with pytest.raises(IncompatiblePair, match="tokenizer length"):
        check_pair(cfg, cfg, tokenizer, other)
