"""Data path: LLaVA JSON -> shards -> ShardDataset -> sampler -> encoded conversations -> batches.

Everything runs on real files written here (images in several modes, broken files, shards) and on
the real demo data and tokenizer built by data_prep/make_demo_data.py.
"""

import json
import os
import pickle
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from assets import load_demo_module
from PIL import Image

from recipe.data import (
    IGNORE_INDEX,
    Collator,
    DroppedSample,
    ResumableDistributedSampler,
    ShardDataset,
    convert_to_shards,
    encode_conversation,
    encode_prompt,
    image_token_id,
    read_index,
)
from recipe.data.shards import InputError, NothingKept

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ)


def run_script(script: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "data_prep", script), *map(str, args)],
        capture_output=True, text=True, env=ENV, timeout=120,
    )


def shard_dir_bytes(path) -> dict:
    """{file name: bytes} of everything a conversion wrote."""
    return {name: open(os.path.join(path, name), "rb").read() for name in sorted(os.listdir(path))}


def turns(*values) -> list[dict]:
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


# ---------------------------------------------------------------------------------------------------
# Real image files in every mode the converter must handle, and broken ones


def noise(h: int, w: int, channels: int, seed: int) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 256, size=(h, w, channels), dtype=np.uint8)


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    Image.fromarray(noise(24, 40, 3, 0)).save(root / "rgb.jpg", quality=90)
    Image.fromarray(noise(20, 16, 1, 1)[:, :, 0], mode="L").save(root / "gray.png")
    Image.fromarray(noise(18, 22, 3, 2)).quantize(colors=16).save(root / "palette.png")
    Image.fromarray(noise(16, 16, 4, 3), mode="RGBA").save(root / "rgba.png")
    Image.fromarray(noise(20, 20, 4, 4), mode="CMYK").save(root / "cmyk.jpg", quality=90)
    Image.fromarray(noise(60, 100, 3, 5)).save(root / "big.png")
    jpeg = (root / "rgb.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "empty.jpg").write_bytes(b"")
    (root / "not_an_image.jpg").write_bytes(b"this is text, not a JPEG\n" * 10)
    os.makedirs(root / "sub")
    Image.fromarray(noise(8, 8, 3, 6)).save(root / "sub" / "nested.png")
    return root


def image_sample(sample_id, image, *values, **extra):
    return {"id": sample_id, "image": image, "conversations": turns(*values), **extra}


GOOD = [
    image_sample("rgb", "rgb.jpg", "<image>\nWhat is shown?", "Noise.", type="describe"),
    image_sample("gray", "gray.png", "Describe it.\n<image>", "Gray noise."),
    image_sample("palette", "palette.png", "<image>\nColours?", "Sixteen.", "And the size?", "Small."),
    image_sample("rgba", "rgba.png", "<image> What is it?", "Transparent noise."),
    image_sample("cmyk", "cmyk.jpg", "<image>\nPrint colours?", "Yes."),
    image_sample("nested", "sub/nested.png", "<image>\nTiny?", "Yes, tiny."),
    {"id": 7, "conversations": turns("What is 3 plus 4?", "7"), "type": "arithmetic"},
]

# (sample, the reason code it must be rejected with)
BAD = [
    (image_sample("missing", "nope.jpg", "<image>\nQ?", "A."), "missing_image"),
    (image_sample("truncated", "truncated.jpg", "<image>\nQ?", "A."), "undecodable_image"),
    (image_sample("garbage", "not_an_image.jpg", "<image>\nQ?", "A."), "undecodable_image"),
    (image_sample("empty", "empty.jpg", "<image>\nQ?", "A."), "empty_image"),
    (image_sample("dir", "sub", "<image>\nQ?", "A."), "missing_image"),
    (image_sample("no_tag", "rgb.jpg", "Q?", "A."), "image_tag_count"),
    (image_sample("two_tags", "rgb.jpg", "<image><image>\nQ?", "A."), "image_tag_count"),
    (image_sample("late_tag", "rgb.jpg", "<image>\nQ?", "A.", "<image> again?", "B."), "image_tag_count"),
    ({"id": "text_tag", "conversations": turns("<image>\nQ?", "A.")}, "image_tag_count"),
    ({"id": "gpt_first", "conversations": turns("Q?", "A.")[::-1]}, "bad_roles"),
    ({"id": "ends_human", "conversations": turns("Q?", "A.", "Q2?")}, "bad_roles"),
    ({"id": "two_humans", "conversations": [{"from": "human", "value": "Q?"}] * 2}, "bad_roles"),
    ({"id": "empty_answer", "conversations": turns("Q?", "  ")}, "empty_turn"),
    ({"id": "no_turns", "conversations": []}, "bad_conversations"),
    ({"id": "no_conversations"}, "bad_conversations"),
    ({"id": "bad_turn", "conversations": [{"from": "human"}, {"from": "gpt", "value": "A."}]}, "bad_turn"),
    ({"id": "image_list", "image": ["a.jpg"], "conversations": turns("<image>\nQ?", "A.")}, "bad_image_field"),
    ({"conversations": turns("Q?", "A.")}, "missing_id"),
    ("just a string", "not_an_object"),
]


def write_json(path, records) -> str:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(records, f)
    return str(path)


def convert(records, image_root, out, **options) -> dict:
    """Write records as OUT.json and convert them into the shard directory OUT."""
    return convert_to_shards(write_json(f"{out}.json", records), str(image_root), str(out), progress=False, **options)


def read_rgb(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


# ---------------------------------------------------------------------------------------------------
# Conversion and reading


def test_roundtrip_text_and_pixels(tmp_path, image_root):
    out = tmp_path / "shards"
    stats = convert(GOOD, image_root, out, samples_per_shard=3)
    assert stats["kept"] == 7 and stats["rejected"] == 0
    assert (stats["with_image"], stats["text_only"], stats["rounds"], stats["multi_round"]) == (6, 1, 8, 1)

    index = read_index(str(out))
    assert index["__kind__"] == "wids-shard-index-v1" and index["wids_version"] == 1
    assert index["shardlist"] == [
        {"url": "shard-000000.tar", "nsamples": 3},
        {"url": "shard-000001.tar", "nsamples": 3},
        {"url": "shard-000002.tar", "nsamples": 1},
    ]
    with tarfile.open(out / "shard-000000.tar") as tar:
        assert tar.getnames() == ["000000000.json", "000000000.jpg", "000000001.json", "000000001.png",
                                  "000000002.json", "000000002.png"]
        assert all(m.mtime == 0 and m.uid == 0 and m.uname == "" for m in tar.getmembers())
        assert tar.extractfile("000000000.jpg").read() == (image_root / "rgb.jpg").read_bytes()  # original bytes

    dataset = ShardDataset(str(out))
    assert len(dataset) == 7
    for i, original in enumerate(GOOD):
        item = dataset[i]
        assert {k: v for k, v in item.items() if k != "image"} == {k: v for k, v in original.items() if k != "image"}
        if "image" in original:
            assert item["image"].mode == "RGB"
            assert np.array_equal(np.asarray(item["image"]), read_rgb(image_root / original["image"]))
            assert dataset.meta(i)["image"] == original["image"]
        else:
            assert item["image"] is None
    with pytest.raises(IndexError):
        dataset[7]


def test_bad_samples_are_rejected_with_their_reason(tmp_path, image_root):
    records = [GOOD[0], *[sample for sample, _ in BAD], GOOD[4], GOOD[6]]
    out = tmp_path / "shards"
    stats = convert(records, image_root, out)

    kept = ShardDataset(str(out))
    assert [kept[i]["id"] for i in range(len(kept))] == ["rgb", "cmyk", 7]
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    expected = [(sample.get("id") if isinstance(sample, dict) else None, reason) for sample, reason in BAD]
    assert [(r["id"], r["reason"]) for r in rejects] == expected
    assert [r["index"] for r in rejects] == list(range(1, len(BAD) + 1))
    assert stats["rejected"] == len(BAD) and stats["kept"] == 3
    assert stats["rejected_by_reason"]["undecodable_image"] == 2 and stats["rejected_by_reason"]["image_tag_count"] == 4
    assert sum(stats["rejected_by_reason"].values()) == len(BAD)
    assert read_index(str(out))["stats"] == stats


def test_jsonl_input_and_several_files(tmp_path, image_root):
    jsonl = tmp_path / "more.jsonl"
    jsonl.write_text("\n".join(json.dumps(s) for s in GOOD[4:]) + "\n\n")
    out = tmp_path / "shards"
    inputs = [write_json(tmp_path / "a.json", GOOD[:4]), str(jsonl)]
    convert_to_shards(inputs, str(image_root), str(out), progress=False)
    dataset = ShardDataset(str(out))
    assert [dataset[i]["id"] for i in range(len(dataset))] == [s["id"] for s in GOOD]


def test_jsonl_records_may_hold_unicode_line_separators(tmp_path, image_root):
    # json.dumps(ensure_ascii=False) leaves U+2028, U+0085 and friends raw inside strings; only "\n" ends a record.
    records = [{"id": "sep", "conversations": turns("Line\u2028break\x85here?", "Yes\u2029\x1c.")}, GOOD[6]]
    jsonl = tmp_path / "sep.jsonl"
    jsonl.write_text("\r\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\r\n", encoding="utf-8")
    out = tmp_path / "shards"
    stats = convert_to_shards(str(jsonl), str(image_root), str(out), progress=False)
    dataset = ShardDataset(str(out))
    assert stats["kept"] == 2 and dataset[0]["conversations"] == records[0]["conversations"]


def test_16_bit_grayscale_keeps_its_range_and_float_images_are_rejected(tmp_path):
    ramp = np.linspace(0, 65535, 64).astype(np.uint16).reshape(8, 8)
    Image.fromarray(ramp).save(tmp_path / "gray16.png")
    Image.fromarray(np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8), mode="F").save(tmp_path / "float.tif")
    with Image.open(tmp_path / "gray16.png") as check:
        assert check.mode.startswith("I")  # really a 16-bit file
    records = [image_sample("g16", "gray16.png", "<image>\nQ?", "A."),
               image_sample("f32", "float.tif", "<image>\nQ?", "A.")]
    out = tmp_path / "shards"
    stats = convert(records, tmp_path, out)
    pixels = np.asarray(ShardDataset(str(out))[0]["image"])
    # PIL's own convert("RGB") would clip at 255: all but the first pixel white.
    assert np.array_equal(pixels[..., 0], np.round(ramp / 257).astype(np.uint8))
    assert (pixels[..., 0] == pixels[..., 2]).all()
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert stats["kept"] == 1 and [(r["id"], r["reason"]) for r in rejects] == [("f32", "undecodable_image")]


def test_cli_errors_are_one_line_and_non_zero(tmp_path, image_root):
    absent = tmp_path / "absent.json"
    missing = run_script("llava_to_shards.py", "--json", absent, "--image-root", image_root, "--out", tmp_path / "o")
    assert missing.returncode == 2
    assert missing.stderr.strip().count("\n") == 0 and "input file not found" in missing.stderr

    (tmp_path / "broken.json").write_text('[{"id": 1,')
    with pytest.raises(InputError, match="not valid JSON"):
        convert_to_shards(str(tmp_path / "broken.json"), str(image_root), str(tmp_path / "o"), progress=False)
    (tmp_path / "object.json").write_text('{"id": 1}')
    with pytest.raises(InputError, match="expected a JSON list"):
        convert_to_shards(str(tmp_path / "object.json"), str(image_root), str(tmp_path / "o"), progress=False)
    with pytest.raises(NothingKept, match="missing_image=1"):
        convert([BAD[0][0]], image_root, tmp_path / "o")

    ok = run_script("llava_to_shards.py", "--json", write_json(tmp_path / "in.json", GOOD + [BAD[0][0]]),
                    "--image-root", image_root, "--out", tmp_path / "cli", "--workers", "2")
    assert ok.returncode == 0, ok.stderr
    assert "kept 7/8 samples" in ok.stdout and "missing_image=1" in ok.stdout


def test_conversion_is_deterministic(tmp_path, image_root):
    records = write_json(tmp_path / "in.json", GOOD + [sample for sample, _ in BAD] + GOOD)
    convert_to_shards(records, str(image_root), str(tmp_path / "a"), samples_per_shard=4, workers=1, progress=False)
    convert_to_shards(records, str(image_root), str(tmp_path / "b"), samples_per_shard=4, workers=2, progress=False)
    a, b = shard_dir_bytes(tmp_path / "a"), shard_dir_bytes(tmp_path / "b")
    assert list(a) == ["index.json", "rejects.jsonl"] + [f"shard-00000{n}.tar" for n in range(4)]
    assert a == b


def test_interrupted_run_is_completed_by_rerun(tmp_path, image_root):
    records = write_json(tmp_path / "in.json", GOOD * 2)
    convert_to_shards(records, str(image_root), str(tmp_path / "ref"), samples_per_shard=4, progress=False)
    out = tmp_path / "out"
    convert_to_shards(records, str(image_root), str(out), samples_per_shard=4, progress=False)
    # What a kill during shard 1 leaves: shard 0 complete, shard 1 half-written under its tmp name,
    # no index (it is removed at the start of a run and written last), plus a stale extra shard.
    half = (out / "shard-000001.tar").read_bytes()
    (out / "shard-000001.tar").unlink()
    (out / "shard-000001.tar.tmp").write_bytes(half[: len(half) // 2])
    (out / "shard-000007.tar").write_bytes(b"from an older, bigger run")
    (out / "index.json").unlink()
    with pytest.raises(FileNotFoundError, match="conversion did not finish"):
        ShardDataset(str(out))

    convert_to_shards(records, str(image_root), str(out), samples_per_shard=4, progress=False)
    assert shard_dir_bytes(out) == shard_dir_bytes(tmp_path / "ref")
    assert len(ShardDataset(str(out))) == 14


def test_max_image_side_resizes_only_large_images(tmp_path, image_root):
    out = tmp_path / "shards"
    records = [image_sample("big", "big.png", "<image>\nQ?", "A."), GOOD[0]]
    stats = convert(records, image_root, out, max_image_side=50)
    dataset = ShardDataset(str(out))
    assert dataset[0]["image"].size == (50, 30) and stats["resized_images"] == 1
    assert np.array_equal(np.asarray(dataset[1]["image"]), read_rgb(image_root / "rgb.jpg"))  # 40x24 fits: untouched


def test_dataset_over_several_dirs_pickles_and_works_in_workers(tmp_path, image_root):
    convert(GOOD, image_root, tmp_path / "a", samples_per_shard=2)
    convert(GOOD[:2], image_root, tmp_path / "b")
    dataset = ShardDataset([str(tmp_path / "a"), str(tmp_path / "b")])
    ids = [dataset[i]["id"] for i in range(len(dataset))]  # opens files and builds offset tables
    assert ids == [s["id"] for s in GOOD] + ["rgb", "gray"]

    clone = pickle.loads(pickle.dumps(dataset))
    assert np.array_equal(np.asarray(clone[8]["image"]), np.asarray(dataset[8]["image"]))
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, num_workers=2, collate_fn=lambda batch: batch)
    assert [item["id"] for batch in loader for item in batch] == ids


# ---------------------------------------------------------------------------------------------------
# Sampler


def draw(sampler, loader_batch: int, steps: int, world_size: int, accum: int) -> list[int]:
    """What one rank's training loop takes for `steps` optimizer steps, advancing like the trainer."""
    loader = torch.utils.data.DataLoader(range(sampler.num_samples), batch_size=loader_batch, sampler=sampler)
    taken, iterator = [], iter(loader)
    for _ in range(steps):
        for _ in range(accum):
            taken += next(iterator).tolist()
        sampler.advance(loader_batch * accum * world_size)
    return taken


@pytest.mark.parametrize("world_size", [1, 2])
def test_sampler_resume_is_exact(world_size):
    n, micro, accum, seed = 53, 3, 2, 11
    per_step = micro * accum * world_size
    steps_per_epoch = (-(-n // world_size) * world_size) // per_step

    def make(rank):
        return ResumableDistributedSampler(n, rank=rank, world_size=world_size, seed=seed)

    # Uninterrupted: two epochs.
    full = {}
    for rank in range(world_size):
        sampler, full[rank] = make(rank), []
        for epoch in range(2):
            sampler.set_epoch(epoch)
            full[rank] += draw(sampler, micro, steps_per_epoch, world_size, accum)

    # Interrupted after 3 steps of epoch 1, resumed from the saved state by fresh samplers.
    for rank in range(world_size):
        sampler, got = make(rank), []
        sampler.set_epoch(0)
        got += draw(sampler, micro, steps_per_epoch, world_size, accum)
        sampler.set_epoch(1)
        got += draw(sampler, micro, 3, world_size, accum)
        state = sampler.state_dict()
        assert state == {"epoch": 1, "consumed": 3 * per_step}

        resumed = make(rank)
        resumed.load_state_dict(json.loads(json.dumps(state)))  # as it travels in a checkpoint
        resumed.set_epoch(1)  # the epoch loop calls this again on resume: must not reset
        assert len(resumed) == len(make(rank)) - 3 * micro * accum
        got += draw(resumed, micro, steps_per_epoch - 3, world_size, accum)
        assert got == full[rank]

    # Every epoch covers all samples (padded by wrap-around to a multiple of world_size), in a new order.
    orders = []
    for epoch in range(2):
        sampler = make(0)
        sampler.set_epoch(epoch)
        orders.append(sampler.global_order().tolist())
        assert sorted(set(orders[-1])) == list(range(n)) and len(orders[-1]) == -(-n // world_size) * world_size
    assert orders[0] != orders[1]
    if world_size == 2:  # the ranks split an epoch's order between them
        k = steps_per_epoch * micro * accum  # per rank in epoch 0
        assert sorted(full[0][:k] + full[1][:k]) == sorted(orders[0][: 2 * k])
        assert not set(full[0][:k]) & set(full[1][:k])


def test_sampler_checks_its_state():
    sampler = ResumableDistributedSampler(10, rank=1, world_size=2, seed=0, shuffle=False, drop_last=True)
    assert list(sampler) == [1, 3, 5, 7, 9]
    sampler.advance(4)
    assert list(sampler) == [5, 7, 9] and len(sampler) == 3
    with pytest.raises(ValueError, match="multiple of world_size"):
        sampler.load_state_dict({"epoch": 0, "consumed": 3})
    with pytest.raises(ValueError, match="already consumed"):
        sampler.advance(8)
    sampler.set_epoch(1)
    assert sampler.state_dict() == {"epoch": 1, "consumed": 0}
    with pytest.raises(ValueError):
        ResumableDistributedSampler(10, rank=2, world_size=2, seed=0)


# ---------------------------------------------------------------------------------------------------
# Demo data and its tokenizer


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    result = run_script("make_demo_data.py", "--out", out, "--n-train", 40, "--n-eval", 10, "--seed", 3)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("demo data: 40 train + 10 eval samples")
    return out


@pytest.fixture(scope="module")
def tokenizer(demo_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(demo_dir / "tokenizer"))


def test_demo_data_converts_and_loads(demo_dir):
    train, evaluation = ShardDataset(str(demo_dir / "train")), ShardDataset(str(demo_dir / "eval"))
    assert (len(train), len(evaluation)) == (40, 10)
    raw = json.loads((demo_dir / "raw" / "train.json").read_text())
    items = [train[i] for i in range(len(train))]
    assert [item["id"] for item in items] == [r["id"] for r in raw]
    assert {item["image"].size for item in items if item["image"] is not None} == {(32, 32)}
    assert any(item["image"] is None for item in items) and any(len(item["conversations"]) == 4 for item in items)
    types = {item["type"] for item in items}
    assert {"color", "shape", "digit", "arithmetic"} <= types
    for item in items:
        answers = [turn["value"] for turn in item["conversations"][1::2]]
        assert all(len(answer.split()) == 1 for answer in answers) and item["type"] == item["round_types"][-1]

    def pairs(dataset):  # (image bytes, questions) of every sample
        return {(dataset.read(i)[1], json.dumps(dataset.meta(i)["conversations"][0::2])) for i in range(len(dataset))}

    assert not pairs(train) & pairs(evaluation)


def test_demo_builder_is_deterministic(tmp_path):
    demo = load_demo_module()
    for name in ("a", "b"):
        demo.build_demo(str(tmp_path / name), n_train=30, n_eval=8, seed=5, image_size=24)
    for sub in ("train", "eval"):
        assert shard_dir_bytes(tmp_path / "a" / sub) == shard_dir_bytes(tmp_path / "b" / sub)
    assert ShardDataset(str(tmp_path / "a" / "train"))[0]["id"] == "train-000000"


def test_demo_tokenizer(tokenizer):
    for token in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"):
        assert len(tokenizer.encode(token, add_special_tokens=False)) == 1
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"
    assert 256 < len(tokenizer) <= 1000
    text = "<image>\nWhat is the sum of the digits? 12 ünïcödé"
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    messages = [{"role": "user", "content": "Hi?"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"
    )


# ---------------------------------------------------------------------------------------------------
# Conversation encoding and collation

MULTI_TURN = turns("<image>\nWhat color is the shape?", "purple", "What shape is it?", "big square")


def test_labels_cover_exactly_the_answers_and_end_of_turn(tokenizer):
    encoded = encode_conversation(MULTI_TURN, tokenizer, num_image_tokens=4, max_length=200)
    ids, labels = encoded["input_ids"].tolist(), encoded["labels"].tolist()
    assert len(ids) == len(labels)
    supervised = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    assert all(labels[i] == ids[i] for i in supervised)  # not shifted

    spans, start = [], supervised[0]  # contiguous supervised spans
    for a, b in zip(supervised, supervised[1:] + [None]):
        if b != a + 1:
            spans.append((start, a + 1))
            start = b
    assert [tokenizer.decode(ids[a:b]) for a, b in spans] == ["purple<|im_end|>", "big square<|im_end|>"]
    for a, b in spans:
        assert tokenizer.decode(ids[:a]).endswith("<|im_start|>assistant\n")  # header unsupervised
        assert tokenizer.decode(ids[b : b + 1]) == "\n" and labels[b] == IGNORE_INDEX  # newline after <|im_end|>
    assert spans[-1][1] == len(ids) - 1  # only the final "\n" follows the last answer

    # The tokenizer's own chat template and the built-in ChatML agree token for token, and the
    # piecewise tokenization equals tokenizing the whole rendered text at once.
    chatml = encode_conversation(MULTI_TURN, tokenizer, num_image_tokens=4, max_length=200, template="chatml")
    assert torch.equal(chatml["input_ids"], encoded["input_ids"]) and torch.equal(chatml["labels"], encoded["labels"])
    assert tokenizer(tokenizer.decode(ids), add_special_tokens=False)["input_ids"] == ids


def test_image_token_expansion(tokenizer):
    image_id = image_token_id(tokenizer, "<image>")
    encoded = encode_conversation(MULTI_TURN, tokenizer, num_image_tokens=7, max_length=200)
    ids = encoded["input_ids"]
    positions = (ids == image_id).nonzero().flatten().tolist()
    assert len(positions) == 7 and positions == list(range(positions[0], positions[0] + 7))
    assert (encoded["labels"][positions] == IGNORE_INDEX).all()
    text_only = encode_conversation(turns("What is 3 plus 4?", "7"), tokenizer, num_image_tokens=7, max_length=200)
    assert (text_only["input_ids"] == image_id).sum() == 0
    with pytest.raises(ValueError, match="no single token"):
        encode_conversation(MULTI_TURN, tokenizer, image_token="<img>", num_image_tokens=7, max_length=200)


def test_truncation(tokenizer):
    image_id = image_token_id(tokenizer, "<image>")
    full = encode_conversation(MULTI_TURN, tokenizer, num_image_tokens=16, max_length=1000)
    ids = full["input_ids"].tolist()
    last_image = max(i for i, t in enumerate(ids) if t == image_id)
    first_answer = min(i for i, t in enumerate(full["labels"].tolist()) if t != IGNORE_INDEX)

    with pytest.raises(DroppedSample) as cut_image:
        encode_conversation(MULTI_TURN, tokenizer, num_image_tokens=16, max_length=last_image)  # drops one image token
    assert cut_image.value.reason == "image_truncated"
    with pytest.raises(DroppedSample) as no_answer:
        encode_conversation(MULTI_TURN, tokenizer, num_image_tokens=16, max_length=first_answer)
    assert no_answer.value.reason == "no_supervised_tokens"

    cut = encode_conversation(MULTI_TURN, tokenizer, num_image_tokens=16, max_length=first_answer + 1)
    assert cut["input_ids"].tolist() == ids[: first_answer + 1]
    assert (cut["labels"] != IGNORE_INDEX).sum() == 1


def test_encode_prompt_is_the_training_prefix(tokenizer):
    full = encode_conversation(MULTI_TURN, tokenizer, num_image_tokens=4, max_length=200)["input_ids"].tolist()
    prompt = encode_prompt(MULTI_TURN, tokenizer, num_image_tokens=4)
    assert prompt["answer"] == "big square"
    n = len(prompt["input_ids"])
    assert prompt["input_ids"].tolist() == full[:n]
    assert tokenizer.decode(prompt["input_ids"]).endswith(
        "purple<|im_end|>\n<|im_start|>user\nWhat shape is it?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tokenizer.decode(full[n:]) == "big square<|im_end|>\n"
    with pytest.raises(DroppedSample):
        encode_prompt(MULTI_TURN, tokenizer, num_image_tokens=4, max_length=n - 1)


def test_collator(demo_dir, tokenizer):
    from transformers import SiglipImageProcessor

    processor = SiglipImageProcessor(size={"height": 32, "width": 32})
    dataset = ShardDataset(str(demo_dir / "train"))
    items = [dataset[i] for i in range(len(dataset))]
    text_item = next(item for item in items if item["image"] is None)
    image_items = [item for item in items if item["image"] is not None][:3]
    long_item = {**image_items[0], "id": "cut-image", "conversations": turns("Why? " * 60 + "\n<image>", "Because.")}
    long_text = {"id": "cut-answer", "image": None, "conversations": turns("Why? " * 60, "Because.")}
    batch_items = [image_items[0], text_item, long_item, image_items[1], long_text, image_items[2]]

    collate = Collator(tokenizer, processor, num_image_tokens=9, image_token_id=image_token_id(tokenizer, "<image>"),
                       max_length=64, pad_to_multiple_of=8)
    batch = collate(batch_items)
    kept = [image_items[0], text_item, image_items[1], image_items[2]]
    assert batch["ids"] == [item["id"] for item in kept]
    assert batch["dropped"] == {"image_truncated": 1, "no_supervised_tokens": 1}
    assert batch["has_image"].tolist() == [True, False, True, True]
    B, T = batch["input_ids"].shape
    assert B == 4 and T % 8 == 0 and batch["labels"].shape == batch["attention_mask"].shape == (B, T)
    assert batch["input_ids"].dtype == batch["labels"].dtype == batch["attention_mask"].dtype == torch.long
    image_id = image_token_id(tokenizer, "<image>")
    for row, item in enumerate(kept):
        encoded = encode_conversation(item["conversations"], tokenizer, num_image_tokens=9, max_length=64)
        n = len(encoded["input_ids"])
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (T - n)
        assert torch.equal(batch["input_ids"][row, :n], encoded["input_ids"])
        assert (batch["input_ids"][row, n:] == tokenizer.pad_token_id).all()
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
        assert (batch["input_ids"][row] == image_id).sum() == (9 if item["image"] is not None else 0)
    images = [item["image"] for item in kept if item["image"] is not None]
    expected_pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    assert batch["pixel_values"].shape == (3, 3, 32, 32) and batch["pixel_values"].dtype == torch.float32
    assert torch.equal(batch["pixel_values"], expected_pixels.float())

    text_batch = collate([text_item])
    assert text_batch["pixel_values"].shape == (0, 3, 32, 32) and text_batch["has_image"].tolist() == [False]
    empty = collate([long_item, long_item])
    assert empty["input_ids"].shape == (0, 0) and empty["ids"] == [] and empty["dropped"] == {"image_truncated": 2}
