"""Evaluation: answer extraction and normalisation, batched generation against a plain greedy loop, accuracy on
a dataset whose correct answers are known by construction, the CLI, and synced generation under ZeRO-3."""
import json
import os
import subprocess
import sys

import pytest
import torch
from assets import REPO, free_port, run_module

from recipe.data import ShardDataset, convert_to_shards, encode_prompt
from recipe.evaluate import evaluate_model, extract_answer, format_summary, normalize_answer, summarize
from recipe.evaluate import main as evaluate_main
from recipe.models import image_token_count, load_image_processor, load_tokenizer, load_vlm

MAX_NEW_TOKENS = 16
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: intra-op threads cost more than they save, and on a busy machine they wait on each other
    (10-30x slower here). Restored afterwards for the other test modules."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("text, expected", [
    ("red", "red"),
    ("Red.", "red"),
    ("  RED!  ", "red"),
    ("The red circle", "red circle"),
    ("a   square ", "square"),
    ("An apple?", "apple"),
    ("three", "3"),
    ("Three.", "3"),
    ("twenty-one", "21"),
    ("Twenty one", "21"),
    ("twelve", "12"),
    ("'7'", "7"),
    ('"top"', "top"),
    ("3.5", "3.5"),
    ("-3", "-3"),
    ("A", "a"),  # a multiple-choice letter is not an article to drop
    ("", ""),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


@pytest.mark.parametrize("generated, expected", [
    ("red<|im_end|>", "red"),
    ("red<|im_end|>\n<|im_start|>user", "red"),
    ("7<|endoftext|><|endoftext|>", "7"),
    ("blue\nmore text", "blue"),
    ("  \n 5 \n6", "5"),  # leading blank lines are skipped, the first line is the answer
    ("left side<|im_end|>", "left side"),
    ("x</s>", "x"),
    ("no stop at all", "no stop at all"),
    ("<|im_end|>", ""),
])
def test_extract_answer(generated, expected):
    assert extract_answer(generated) == expected


# ---------------------------------------------------------------------------------------------------
# On a tiny real checkpoint


@pytest.fixture(scope="module")
def student(demo_assets):
    path = demo_assets["student"]
    return load_vlm(path), load_tokenizer(path), load_image_processor(path)


def plain_greedy_answer(model, tokenizer, image_processor, item) -> str:
    """Reference: one sample, no padding, no cache, no generate(): the full sequence through the model at every
    step, argmax, append, stop at <|im_end|> or eos; the answer is the first line of the decoded text."""
    stops = {tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id}
    ids = encode_prompt(item["conversations"], tokenizer, num_image_tokens=image_token_count(model.config))["input_ids"]
    ids = ids[None]
    pixels = (image_processor(images=[item["image"]], return_tensors="pt")["pixel_values"]
              if item["image"] is not None else None)
    new = []
    with torch.no_grad():
        for _ in range(MAX_NEW_TOKENS):
            logits = model(input_ids=ids, pixel_values=pixels).logits[0, -1]
            logits[model.config.image_token_id] = float("-inf")  # an answer never contains image tokens
            token = int(logits.argmax())
            if token in stops:
                break
            new.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return tokenizer.decode(new).strip().split("\n")[0].strip()


def test_batched_evaluation_matches_a_plain_greedy_loop(student, demo_assets):
    model, tokenizer, image_processor = student
    dataset = ShardDataset(demo_assets["eval"])
    # Two text-only samples, two multi-round ones (earlier answers in the prompt) and plain image questions;
    # with batch_size=4 the first batch mixes image and text-only rows.
    texts = [i for i in range(len(dataset)) if dataset.meta(i).get("image") is None][:2]
    multi = [i for i in range(len(dataset)) if len(dataset.meta(i)["conversations"]) > 2][:2]
    plain = [i for i in range(len(dataset)) if i not in texts + multi][:2]
    indices = [multi[0], texts[0], plain[0], texts[1], multi[1], plain[1]]
    assert len(texts) == 2 and len(multi) == 2 and len(plain) == 2

    model.train()  # as the trainer hands it over
    results = evaluate_model(model, tokenizer, image_processor, dataset, indices, batch_size=4,
                             max_new_tokens=MAX_NEW_TOKENS, progress=False)
    assert model.training, "evaluate_model must give the model back in training mode"
    model.eval()
    expected = [plain_greedy_answer(model, tokenizer, image_processor, dataset[i]) for i in indices]
    assert [r["prediction"] for r in results] == expected
    assert all(expected), "a random-init model still produces some text"
    assert [r["id"] for r in results] == [dataset.meta(i)["id"] for i in indices]
    assert [r["type"] for r in results] == [dataset.meta(i)["type"] for i in indices]
    assert [r["answer"] for r in results] == [dataset.meta(i)["conversations"][-1]["value"] for i in indices]

    hand_count = sum(normalize_answer(p) == normalize_answer(r["answer"]) for p, r in zip(expected, results))
    summary = summarize(results)
    assert summary["n"] == 6
    assert summary["accuracy"] == hand_count / 6
    assert [r["correct"] for r in results] == [normalize_answer(p) == normalize_answer(r["answer"])
                                               for p, r in zip(expected, results)]


def test_batch_of_four_mixed_and_batch_of_one_give_identical_predictions(student, demo_assets):
    model, tokenizer, image_processor = student
    dataset = ShardDataset(demo_assets["eval"])
    has_image = [dataset.meta(i).get("image") is not None for i in range(len(dataset))]
    mixed = [b for b in range(0, 16, 4) if len(set(has_image[b : b + 4])) == 2]
    assert mixed, "the demo eval split should put image and text-only samples in one batch of 4"
    indices = range(16)
    batched = evaluate_model(model, tokenizer, image_processor, dataset, indices, batch_size=4, progress=False)
    single = evaluate_model(model, tokenizer, image_processor, dataset, indices, batch_size=1, progress=False)
    assert [r["prediction"] for r in batched] == [r["prediction"] for r in single]
    assert batched == single


def test_accuracy_on_a_dataset_whose_correct_answers_are_known(student, demo_assets, tmp_path):
    """References set to what the model really answers (in another surface form) for half of the samples and
    to something it never says for the other half: accuracy is exactly 0.5, per type as constructed."""
    model, tokenizer, image_processor = student
    model.eval()
    raw_dir = os.path.join(demo_assets["data"], "raw")
    with open(os.path.join(raw_dir, "eval.json")) as f:
        records = json.load(f)[:8]
    source = ShardDataset(demo_assets["eval"])
    assert [source.meta(i)["id"] for i in range(8)] == [r["id"] for r in records]
    assert any(r.get("image") is None for r in records) and any(len(r["conversations"]) > 2 for r in records)

    # alpha: 3 of 4 right; beta: 1 of 4 right.
    plan = [("alpha", True), ("alpha", False), ("alpha", True), ("alpha", True),
            ("beta", False), ("beta", True), ("beta", False), ("beta", False)]
    for record, (kind, right), i in zip(records, plan, range(8)):
        said = plain_greedy_answer(model, tokenizer, image_processor, source[i])
        reference = f"The {said}!" if right else "never said by the model"
        assert (normalize_answer(reference) == normalize_answer(said)) == right  # the construction holds
        record["conversations"][-1]["value"] = reference
        record["type"] = kind
    json_path = tmp_path / "known.json"
    json_path.write_text(json.dumps(records))
    convert_to_shards(str(json_path), os.path.join(raw_dir, "images"), str(tmp_path / "shards"), progress=False)

    dataset = ShardDataset(str(tmp_path / "shards"))
    results = evaluate_model(model, tokenizer, image_processor, dataset, range(len(dataset)), batch_size=4,
                             progress=False)
    assert [r["correct"] for r in results] == [right for _, right in plan]
    summary = summarize(results)
    assert summary == {"n": 8, "accuracy": 0.5, "per_type": {"alpha": {"n": 4, "accuracy": 0.75},
                                                             "beta": {"n": 4, "accuracy": 0.25}}}
    assert format_summary(summary) == "accuracy 0.500 (4/8) | alpha 0.75 (4) | beta 0.25 (4)"


def test_summarize_without_types_and_when_empty():
    results = [{"id": 1, "type": None, "prediction": "3", "answer": "three", "correct": True},
               {"id": 2, "type": None, "prediction": "x", "answer": "y", "correct": False},
               {"id": 3, "type": None, "prediction": "y", "answer": "y", "correct": True}]
    assert summarize(results) == {"n": 3, "accuracy": 2 / 3, "per_type": {}}
    assert format_summary(summarize(results)) == "accuracy 0.667 (2/3)"
    assert summarize([]) == {"n": 0, "accuracy": 0.0, "per_type": {}}


def test_prompt_too_long_scores_as_wrong_and_says_so(student, demo_assets):
    model, tokenizer, image_processor = student
    dataset = ShardDataset(demo_assets["eval"])
    text_only = next(i for i in range(len(dataset)) if dataset.meta(i).get("image") is None)
    image = next(i for i in range(len(dataset)) if dataset.meta(i).get("image") is not None)
    def prompt_length(i):
        return len(encode_prompt(dataset[i]["conversations"], tokenizer,
                                 num_image_tokens=image_token_count(model.config))["input_ids"])

    limit = prompt_length(text_only)  # the text-only prompt just fits, the image prompt does not
    assert prompt_length(image) > limit
    results = evaluate_model(model, tokenizer, image_processor, dataset, [image, text_only], max_length=limit,
                             progress=False)
    assert results[0]["dropped"] == "prompt_too_long" and results[0]["correct"] is False
    assert results[0]["prediction"] == ""
    assert "dropped" not in results[1] and results[1]["prediction"]


# ---------------------------------------------------------------------------------------------------
# Command line


def test_cli_writes_the_report_and_prints_the_summary(student, demo_assets, tmp_path):
    model, tokenizer, image_processor = student
    dataset = ShardDataset(demo_assets["eval"])
    n = len(dataset) - 4  # --max-samples: the first n
    out = tmp_path / "report.json"
    proc = run_module(["-m", "recipe.evaluate", "--model", demo_assets["student"], "--data", demo_assets["eval"],
                       "--batch-size", "8", "--max-new-tokens", str(MAX_NEW_TOKENS), "--max-samples", str(n),
                       "--out", str(out), "--device", "cpu"], env=ONE_THREAD)
    with open(out) as f:
        report = json.load(f)
    assert report["model"] == demo_assets["student"] and report["data"] == [demo_assets["eval"]]
    assert report["n"] == n == len(report["samples"])
    assert set(report["samples"][0]) == {"id", "type", "prediction", "answer", "correct"}
    # The same predictions as the library in this process, and the summary computed from them.
    expected = evaluate_model(model, tokenizer, image_processor, dataset, range(n), batch_size=8, progress=False)
    assert report["samples"] == expected
    summary = summarize(expected)
    assert {k: report[k] for k in ("n", "accuracy", "per_type")} == summary
    assert sum(t["n"] for t in report["per_type"].values()) == n
    assert proc.stdout.strip() == format_summary(summary)


@pytest.mark.parametrize("flag, value, message", [
    ("--model", "no_such_model", "no model checkpoint at"),
    ("--data", "no_such_shards", "index.json not found"),
    ("--max-samples", "0", "--max-samples must be >= 1"),
    ("--batch-size", "0", "--batch-size must be >= 1"),
    ("--max-new-tokens", "-1", "--max-new-tokens must be >= 1"),
])
def test_cli_bad_input_stops_with_an_error_line(demo_assets, tmp_path, flag, value, message):
    args = {"--model": demo_assets["student"], "--data": demo_assets["eval"],
            flag: str(tmp_path / value) if flag in ("--model", "--data") else value}
    with pytest.raises(SystemExit) as stop:
        evaluate_main([item for pair in args.items() for item in pair] + ["--device", "cpu"])
    # sys.exit(str): the interpreter prints the one line to stderr and exits with status 1.
    assert str(stop.value.code).startswith("error: ") and message in str(stop.value.code)
    assert "\n" not in str(stop.value.code)
    if flag in ("--model", "--data"):
        assert str(tmp_path / value) in str(stop.value.code)


# ---------------------------------------------------------------------------------------------------
# Synced generation on 2 ranks under real DeepSpeed ZeRO-3 (CPU, gloo)

RANK_SCRIPT = r"""
import json, os, sys
import deepspeed, torch
from recipe.data import ShardDataset
from recipe.evaluate import evaluate_model
from recipe.models import load_image_processor, load_tokenizer, load_vlm

model_dir, data_dir, out_dir, plan = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
deepspeed.init_distributed(dist_backend="gloo")
rank = torch.distributed.get_rank()
# Threshold 0: every parameter is partitioned, so each module's forward is an all-gather across the ranks.
config = {"train_micro_batch_size_per_gpu": 1,
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
model = load_vlm(model_dir)
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
results = evaluate_model(engine.module, load_tokenizer(model_dir), load_image_processor(model_dir),
                         ShardDataset(data_dir), plan[rank], batch_size=2, synced_gpus=True, progress=False)
with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
    json.dump(results, f)
torch.distributed.barrier()
"""


@pytest.mark.slow
def test_synced_generation_under_zero3_with_uneven_ranks_and_a_text_only_batch(student, demo_assets, tmp_path):
    """Rank 1 has a text-only batch (no vision tower call of its own) while rank 0 has images, and rank 0 has
    fewer batches than rank 1. Without the stand-in row and batches, the ranks' parameter all-gathers go
    out of step (gloo: "collective mismatch") or a rank waits forever; with them, each rank's results equal
    the single-process ones."""
    model, tokenizer, image_processor = student
    dataset = ShardDataset(demo_assets["eval"])
    texts = [i for i in range(len(dataset)) if dataset.meta(i).get("image") is None][:2]
    images = [i for i in range(len(dataset)) if dataset.meta(i).get("image") is not None]
    plan = [images[:3], texts + images[3:6]]  # batches of 2: rank 0 has 2, rank 1 has 3, its first text-only
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script),
           demo_assets["student"], demo_assets["eval"], str(tmp_path), json.dumps(plan)]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    for rank, indices in enumerate(plan):
        with open(tmp_path / f"rank{rank}.json") as f:
            distributed = json.load(f)
        alone = evaluate_model(model, tokenizer, image_processor, dataset, indices, batch_size=2, progress=False)
        assert distributed == alone
