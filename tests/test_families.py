"""Switch-KD on every model family (recipe/models/families), on tiny real checkpoints written by
`python -m recipe.models.tiny`: the passes against each model's own forward, gradient routing, images of
different sizes, the pair check across and inside families, the shared-vocabulary slice, training on
DeepSpeed and the export."""
import copy
import json
import os
import shutil

import pytest
import torch
from assets import run_module
from PIL import Image
from transformers import AutoConfig, AutoModelForImageTextToText

from recipe.config import LossConfig
from recipe.data import Collator, ShardDataset, encode_prompt
from recipe.models import (
    IncompatiblePair,
    SwitchKDModel,
    check_pair,
    family_of,
    load_chat_template,
    load_image_inputs,
    load_image_processor,
    load_tokenizer,
    load_vlm,
    run_passes,
    supervised_positions,
)
from recipe.models.tiny import write_tiny_vlm

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "internvl", "idefics3", "smolvlm", "llava_onevision"]
IMAGE_SIZES = [(32, 32), (48, 24), (20, 44), (64, 64)]  # (width, height): every family sees several token counts


def write_preset(root, model_type, role, tokenizer, seed):
    """The preset, as `python -m recipe.models.tiny --preset {model_type}-{role}` writes it (in-process: faster)."""
    out = os.path.join(root, f"{model_type}-{role}")
    if not os.path.isfile(os.path.join(out, "config.json")):
        write_tiny_vlm(f"{model_type}-{role}", tokenizer, out, seed)
    return out


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory, demo_assets):
    """{model_type: {"teacher": dir, "student": dir}}: the tiny presets of every family."""
    root = str(tmp_path_factory.mktemp("families"))
    return {model_type: {role: write_preset(root, model_type, role, demo_assets["tokenizer"], seed)
                         for role, seed in (("teacher", 0), ("student", 1))} for model_type in FAMILIES}


def collator_for(student_dir, max_length=400, teacher_dir=None):
    tokenizer = load_tokenizer(student_dir)
    teacher_images = load_image_inputs(teacher_dir, tokenizer=tokenizer) if teacher_dir else None
    return Collator(tokenizer, images=load_image_inputs(student_dir, tokenizer=tokenizer), max_length=max_length,
                    chat_template=load_chat_template(student_dir), teacher_images=teacher_images)


def sized_items(demo_assets):
    """Image samples at IMAGE_SIZES and text-only samples, interleaved (real demo samples, images resized)."""
    dataset = ShardDataset(demo_assets["train"])
    image_items = [dataset[i] for i in range(len(dataset)) if dataset.meta(i).get("image")][:len(IMAGE_SIZES)]
    text_items = [dataset[i] for i in range(len(dataset)) if not dataset.meta(i).get("image")][:2]
    for item, size in zip(image_items, IMAGE_SIZES):
        item["image"] = item["image"].resize(size, Image.Resampling.BICUBIC)
    return [image_items[0], text_items[0], image_items[1], image_items[2], text_items[1], image_items[3]]


def hf_inputs(model, batch):
    """The batch as the model's own forward takes it."""
    family = family_of(model)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              **{key: batch[key] for key in family.image_keys}}
    if model.config.model_type in ("qwen2_vl", "qwen2_5_vl"):  # the processor's output for M-RoPE
        inputs["mm_token_type_ids"] = (batch["input_ids"] == model.config.image_token_id).int()
    return inputs


@pytest.fixture(scope="module", params=FAMILIES)
def family_case(request, family_dirs, demo_assets):
    dirs = family_dirs[request.param]
    torch.manual_seed(0)
    student, teacher = load_vlm(dirs["student"]), load_vlm(dirs["teacher"])
    batch = collator_for(dirs["student"])(sized_items(demo_assets))
    return {"model_type": request.param, "dirs": dirs, "student": student, "teacher": teacher, "batch": batch}


def test_images_of_every_size_and_text_only_samples_share_a_batch(family_case):
    batch, student = family_case["batch"], family_case["student"]
    assert batch["has_image"].tolist() == [True, False, True, True, False, True]
    image_id = student.config.image_token_id
    counts = (batch["input_ids"] == image_id).sum(1).tolist()
    assert counts[1] == counts[4] == 0
    image_counts = [counts[i] for i in (0, 2, 3, 5)]
    assert len(set(image_counts)) > 1, f"{family_case['model_type']}: one token count for every size {image_counts}"
    # The model's own vision path gives exactly one embedding per image token, image by image.
    images = {key: batch[key] for key in family_of(student).image_keys}
    with torch.no_grad():
        embeds = family_of(student).encode_images(student, images).embeds
    assert embeds.shape[0] == sum(image_counts)


def test_teacher_pass_matches_the_models_own_forward(family_case):
    student, teacher, batch = family_case["student"], family_case["teacher"], family_case["batch"]
    passes = run_passes(student, teacher, batch)
    sample, position, targets = supervised_positions(batch["labels"])
    with torch.no_grad():
        full = teacher(**hf_inputs(teacher, batch)).logits
        student_full = student(**hf_inputs(student, batch)).logits
    assert passes.teacher_logits().shape[0] == sample.shape[0] > 0
    torch.testing.assert_close(passes.teacher_logits(), full[sample, position], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(passes.student_logits().detach(), student_full[sample, position], atol=1e-4,
                               rtol=1e-4)
    assert torch.equal(passes.targets, targets)


def test_switch_pass_equals_teacher_pass_when_the_student_has_the_teachers_vision_encoder(family_case):
    student, teacher, batch = copy.deepcopy(family_case["student"]), family_case["teacher"], family_case["batch"]
    family = family_of(student)
    with torch.no_grad():
        for mine, theirs in zip(family.parts(student)["vision"], family.parts(teacher)["vision"], strict=True):
            mine.copy_(theirs)
    passes = run_passes(student, teacher, batch)
    assert passes.switch_logits().shape[0] == int(passes.switch_rows.sum()) > 0
    torch.testing.assert_close(passes.switch_logits(), passes.teacher_logits()[passes.switch_rows], atol=1e-5,
                               rtol=1e-5)
    other = run_passes(family_case["student"], teacher, batch)  # the student's own E_S changes the teacher's output
    assert not torch.allclose(other.switch_logits(), other.teacher_logits()[other.switch_rows], atol=1e-3)


def test_vsd_alone_moves_only_the_student_vision_encoder(family_case):
    student, teacher = copy.deepcopy(family_case["student"]), copy.deepcopy(family_case["teacher"])
    model = SwitchKDModel(student, teacher, LossConfig(candidates=16, impl="torch", ce_weight=0.0,
                                                       align_weight=0.0, vsd_weight=1.0))
    out = model(family_case["batch"])
    out["loss"].backward()
    grads = {name: sum(float(p.grad.abs().sum()) for p in params if p.grad is not None)
             for name, params in family_of(student).parts(student).items()}
    assert out["vsd"] > 0 and grads["vision"] > 0
    assert grads["projector"] == 0 and grads["language"] == 0
    assert all(p.grad is None for p in teacher.parameters())


# ---------------------------------------------------------------------------------------------------
# The pair check and the shared vocabulary


def test_a_cross_family_pair_stops_naming_both_families(family_dirs):
    configs = {t: AutoConfig.from_pretrained(family_dirs[t]["student"]) for t in FAMILIES}
    with pytest.raises(IncompatiblePair, match=r"model family: teacher qwen2_5_vl \(Qwen2-VL / Qwen2.5-VL\) vs "
                                               r"student internvl \(InternVL\)"):
        check_pair(configs["qwen2_5_vl"], configs["internvl"])
    # Qwen2-VL and Qwen2.5-VL share an adapter but not their vision encoders (window attention, merger).
    with pytest.raises(IncompatiblePair, match="model family: teacher qwen2_vl .* vs student qwen2_5_vl"):
        check_pair(configs["qwen2_vl"], configs["qwen2_5_vl"])


@pytest.mark.parametrize("model_type", FAMILIES)
def test_each_family_pair_passes_and_a_token_count_mismatch_is_named_with_both_values(family_dirs, model_type):
    dirs = family_dirs[model_type]
    teacher_cfg, student_cfg = (AutoConfig.from_pretrained(dirs[r]) for r in ("teacher", "student"))
    tokenizers = [load_tokenizer(dirs[r]) for r in ("teacher", "student")]
    processors = [load_image_processor(dirs[r]) for r in ("teacher", "student")]
    pair = check_pair(teacher_cfg, student_cfg, *tokenizers, *processors)
    assert pair.shared_vocab == student_cfg.text_config.vocab_size and pair.notes == []

    wider = copy.deepcopy(student_cfg)
    width_key = {"qwen2_vl": "embed_dim"}.get(model_type, "hidden_size")
    setattr(wider.vision_config, width_key, 48)
    with pytest.raises(IncompatiblePair, match=r"vision feature width .*: teacher \d+ vs student \d+"):
        check_pair(teacher_cfg, wider, *tokenizers, *processors)
    # The image processors fix each image's token count: other bounds or tiles stop the pair, naming both.
    other = copy.deepcopy(processors[1])
    changed = {"qwen2_vl": ("size", {"shortest_edge": 256, "longest_edge": 4096}),
               "qwen2_5_vl": ("size", {"shortest_edge": 256, "longest_edge": 4096}),
               "internvl": ("max_patches", 6), "idefics3": ("max_image_size", {"longest_edge": 16}),
               "smolvlm": ("max_image_size", {"longest_edge": 16}),
               "llava_onevision": ("image_grid_pinpoints", [[32, 32]])}[model_type]
    setattr(other, *changed)
    with pytest.raises(IncompatiblePair, match=r"- image processor [^:]*: teacher .+ vs student .+") as stopped:
        check_pair(teacher_cfg, student_cfg, *tokenizers, processors[0], other)
    assert str(stopped.value).count("\n  - ") == 1  # that one mismatch, nothing else


@pytest.fixture(scope="module")
def padded_teacher(tmp_path_factory, family_dirs):
    """The qwen2_5_vl teacher with 8 padding rows in its embedding and LM head (as Qwen2.5-7B has against 3B)."""
    source = family_dirs["qwen2_5_vl"]["teacher"]
    out = str(tmp_path_factory.mktemp("padded") / "teacher")
    teacher = load_vlm(source)
    teacher.resize_token_embeddings(teacher.config.text_config.vocab_size + 8)
    teacher.save_pretrained(out)
    for name in os.listdir(source):
        if not name.startswith(("model", "config")):
            shutil.copy(os.path.join(source, name), os.path.join(out, name))
    return out


def test_a_teacher_with_padding_rows_is_compared_over_the_shared_range_exactly(family_dirs, padded_teacher,
                                                                               demo_assets):
    from recipe.losses.divergence import divergence

    student_dir = family_dirs["qwen2_5_vl"]["student"]
    teacher_cfg, student_cfg = AutoConfig.from_pretrained(padded_teacher), AutoConfig.from_pretrained(student_dir)
    vocab = student_cfg.text_config.vocab_size
    assert teacher_cfg.text_config.vocab_size == vocab + 8
    pair = check_pair(teacher_cfg, student_cfg, load_tokenizer(padded_teacher), load_tokenizer(student_dir))
    assert pair.shared_vocab == vocab
    assert any(f"the losses compare the first {vocab} ids" in note for note in pair.notes), pair.notes

    student, teacher = load_vlm(student_dir), load_vlm(padded_teacher)
    batch = collator_for(student_dir)(sized_items(demo_assets))
    cfg = LossConfig(candidates=16, impl="torch")
    out = SwitchKDModel(student, teacher, cfg, shared_vocab=pair.shared_vocab)(batch)
    passes = run_passes(student, teacher, batch)
    teacher_logits = passes.teacher_logits()
    assert teacher_logits.shape[1] == vocab + 8
    sliced = teacher_logits[:, :vocab]
    assert torch.equal(out["align"], divergence(sliced, passes.student_logits(), cfg).detach())
    switch = passes.switch_logits()[:, :vocab]
    assert torch.equal(out["vsd"], divergence(sliced[passes.switch_rows], switch, cfg).detach())
    with pytest.raises(ValueError, match="of one shape"):  # unsliced, the two tables cannot be compared at all
        SwitchKDModel(student, teacher, cfg)(batch)


# ---------------------------------------------------------------------------------------------------
# Training on DeepSpeed, the export and evaluation

DEFAULT_TRAINED = "qwen2_5_vl"  # the other families train under -m extended (each run pair takes ~1 minute)


def answer_through_the_hf_path(final: str, image) -> torch.Tensor:
    """What a new user does with an export: the processor's chat template on HF's multimodal messages, the
    processor, generate. Where transformers can build the family's processor (without torchvision it builds
    LLaVA's only: the others' video processors, and Idefics3's image processor lookup, need it), that is
    AutoProcessor; elsewhere the recipe's own processing of the same checkpoint files stands in for it."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is it?"}]}]
    model = AutoModelForImageTextToText.from_pretrained(final)
    try:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(final)
    except (ImportError, ValueError) as missing:  # transformers names torchvision in both
        if "torchvision" not in str(missing).lower():
            raise
        processor = None
    if processor is not None:
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(text=[prompt], images=[image], return_tensors="pt")
    else:
        tokenizer = load_tokenizer(final)
        prompt = tokenizer.apply_chat_template(messages, chat_template=load_chat_template(final), tokenize=False,
                                               add_generation_prompt=True)
        images = load_image_inputs(final, tokenizer=tokenizer)
        text, tensors = images(image)
        assert prompt.count(images.image_token) == 1
        ids = tokenizer(prompt.replace(images.image_token, text), return_tensors="pt", add_special_tokens=False)
        inputs = {**ids, **tensors, **family_of(model).generation_inputs(model, ids["input_ids"])}
    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > inputs["input_ids"].shape[1]
    return generated


def train_family(tmp_path, demo_assets, teacher, student, name, **overrides):
    from test_train import read_metrics, run_training, write_config

    config, out = write_config(tmp_path, demo_assets, name, max_steps=3, save_every=3, micro_batch_size=4,
                               grad_accum=1, **{"student.path": student, "teacher.path": teacher, **overrides})
    log = run_training(config)
    return out, read_metrics(out), log.stdout + log.stderr


def check_zero2_and_zero3_and_the_export(tmp_path, demo_assets, teacher, student):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    zero2, zero2_metrics, log = train_family(tmp_path, demo_assets, teacher, student, "zero2")
    zero3, zero3_metrics, _ = train_family(tmp_path, demo_assets, teacher, student, "zero3", zero_stage=3)
    assert [r["step"] for r in zero2_metrics] == [1, 2, 3]
    for a, b in zip(zero2_metrics, zero3_metrics, strict=True):
        assert a["align"] > 0 and a["vsd"] > 0
        for key in ("loss", "ce", "align", "vsd", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-5), (a["step"], key)
    # DeepSpeed's own zero_to_fp32 rebuilds, from the ZeRO-3 checkpoint, exactly the exported student (the
    # export's file may name keys in the family's checkpoint layout: compare as the loaded model names them).
    final = os.path.join(zero3, "final")
    rebuilt = get_fp32_state_dict_from_zero_checkpoint(os.path.join(zero3, "checkpoints"), tag="step00000003")
    rebuilt = {key.removeprefix("student."): value for key, value in rebuilt.items()}
    exported = AutoModelForImageTextToText.from_pretrained(final).state_dict()
    assert rebuilt.keys() == exported.keys()
    assert all(torch.equal(rebuilt[key], exported[key]) for key in exported)
    start = load_vlm(student).state_dict()
    assert any(not torch.equal(start[key], exported[key]) for key in exported)  # trained, not the initial student
    answer_through_the_hf_path(final, Image.new("RGB", (40, 28), (200, 40, 40)))
    return zero3, log


@pytest.mark.slow
def test_qwen2_5_vl_trains_on_zero2_and_zero3_alike_with_a_padded_teacher_and_exports(tmp_path, demo_assets,
                                                                                      family_dirs, padded_teacher):
    student = family_dirs[DEFAULT_TRAINED]["student"]
    zero3, log = check_zero2_and_zero3_and_the_export(tmp_path, demo_assets, padded_teacher, student)
    vocab = AutoConfig.from_pretrained(student).text_config.vocab_size
    assert f"the losses compare the first {vocab} ids" in log  # said at start-up
    # python -m recipe.evaluate runs on the exported student of this family.
    report = str(tmp_path / "eval.json")
    run_module(["-m", "recipe.evaluate", "--model", os.path.join(zero3, "final"), "--data", demo_assets["eval"],
                "--max-samples", "6", "--batch-size", "3", "--max-new-tokens", "3", "--out", report])
    with open(report) as f:
        result = json.load(f)
    assert result["n"] == 6 and len(result["samples"]) == 6 and all("prediction" in s for s in result["samples"])


@pytest.mark.slow
@pytest.mark.extended
@pytest.mark.parametrize("model_type", [t for t in FAMILIES if t != DEFAULT_TRAINED])
def test_every_other_family_trains_on_zero2_and_zero3_alike_and_exports(tmp_path, demo_assets, family_dirs,
                                                                       model_type):
    dirs = family_dirs[model_type]
    check_zero2_and_zero3_and_the_export(tmp_path, demo_assets, dirs["teacher"], dirs["student"])


def test_the_preset_command_writes_checkpoints_the_auto_classes_load(tmp_path, demo_assets, family_dirs):
    out = str(tmp_path / "cli-preset")
    proc = run_module(["-m", "recipe.models.tiny", "--preset", "internvl-student", "--tokenizer",
                       demo_assets["tokenizer"], "--out", out])
    assert "wrote internvl-student" in proc.stdout
    model = AutoModelForImageTextToText.from_pretrained(out)
    assert type(model).__name__ == "InternVLForConditionalGeneration"
    assert load_chat_template(out) == load_chat_template(family_dirs["internvl"]["student"])
    for model_type in FAMILIES:
        answer_through_the_hf_path(family_dirs[model_type]["student"], Image.new("RGB", (36, 52), (20, 200, 20)))


def test_evaluation_prompts_are_the_training_prefix_on_every_family(family_dirs, demo_assets):
    """encode_prompt (evaluation) with the family's image expansion is, token for token, the start of what the
    collator trains on."""
    item = next(i for i in sized_items(demo_assets) if i["image"] is not None)
    for model_type in FAMILIES:
        student_dir = family_dirs[model_type]["student"]
        collate = collator_for(student_dir)
        batch = collate([item])
        tokenizer, images = collate.tokenizer, collate.images
        text, _ = images(item["image"])
        prompt = encode_prompt(item["conversations"], tokenizer, image_token=images.image_token,
                               image_ids=[tokenizer(text, add_special_tokens=False)["input_ids"]],
                               message_format="multimodal", chat_template=load_chat_template(student_dir))
        n = len(prompt["input_ids"])
        assert torch.equal(batch["input_ids"][0, :n], prompt["input_ids"]), model_type
        assert (batch["labels"][0, :n] == -100).all() and (batch["labels"][0, n:] != -100).any()


def test_training_a_cross_family_pair_stops_before_training(tmp_path, demo_assets, family_dirs):
    from test_train import run_expecting_failure, write_config

    config, out = write_config(tmp_path, demo_assets, "cross", **{
        "student.path": family_dirs["qwen2_5_vl"]["student"], "teacher.path": family_dirs["internvl"]["teacher"]})
    err = run_expecting_failure(config)
    assert "config error" in err and "model family: teacher internvl (InternVL) vs student qwen2_5_vl" in err
    assert not os.path.exists(os.path.join(out, "metrics.jsonl"))


def test_idefics3_image_tokens_are_its_processors(family_dirs):
    """Where transformers can build the family's processor here (Idefics3's has no video processor), the
    recipe's expansion of an image is, token for token, the processor's own."""
    from transformers import Idefics3Processor

    student_dir = family_dirs["idefics3"]["student"]
    tokenizer = load_tokenizer(student_dir)
    images = load_image_inputs(student_dir, tokenizer=tokenizer)
    with open(os.path.join(student_dir, "processor_config.json")) as f:
        image_seq_len = json.load(f)["image_seq_len"]
    processor = Idefics3Processor(image_processor=images.image_processor, tokenizer=tokenizer,
                                  image_seq_len=image_seq_len)
    for size in IMAGE_SIZES + [(16, 16), (90, 30)]:
        image = Image.new("RGB", size, (90, 10, 200))
        text, tensors = images(image)
        theirs = processor(text=["<image>"], images=[[image]], add_special_tokens=False, return_tensors="pt")
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == theirs["input_ids"][0].tolist(), size
        assert torch.equal(tensors["pixel_values"], theirs["pixel_values"])


def test_a_teacher_processor_giving_another_token_count_stops_the_batch_naming_both(family_dirs, demo_assets):
    from recipe.models import ImageInputs

    student_dir = family_dirs["qwen2_vl"]["student"]
    collate = collator_for(student_dir)
    student = collate.images
    teacher_processor = copy.deepcopy(student.image_processor)
    teacher_processor.size = {"shortest_edge": 256, "longest_edge": 16 * 256}  # smaller images keep 1 token
    collate.teacher_images = ImageInputs(family=student.family, config=student.config,
                                         image_processor=teacher_processor, image_token=student.image_token)
    item = dict(sized_items(demo_assets)[0])
    item["image"] = item["image"].resize((16, 16))
    with pytest.raises(ValueError, match=r"image tokens for this image: teacher 1 vs student 4"):
        collate([item])
