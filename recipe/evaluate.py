"""Exact-match evaluation of a VLM checkpoint on shard data: greedy answers to each sample's final question.

    python -m recipe.evaluate --model DIR --data SHARDS [SHARDS ...] [--max-new-tokens 16] [--batch-size 16]
                              [--max-samples N] [--out FILE.json] [--device cpu|cuda]

The prompt is everything up to the last assistant header (earlier rounds with their reference answers
included, exactly as training encodes them); the model answers greedily; the answer is the generated text
up to the first end-of-turn / eos token or newline. Prediction and reference are compared after
normalize_answer. Prints one summary line; --out writes the JSON report
    {"model", "data", "n", "accuracy", "per_type": {type: {"n", "accuracy"}},
     "samples": [{"id", "type", "prediction", "answer", "correct"}]}

Library use (the trainer evaluates with it during training):
    results = evaluate_model(model, tokenizer, image_processor, dataset, indices)   # per sample
    summary = summarize(results)                                                    # n, accuracy, per_type
    print(format_summary(summary))

Distributed (DeepSpeed ZeRO-3): pass synced_gpus=True on every rank, each with its own indices. Every rank
then runs the same number of generate calls (ranks with fewer batches run stand-in batches), generate
keeps the ranks in step token by token, and every batch runs the vision tower (a text-only batch gets a
stand-in image row), so the ranks gather partitioned parameters module for module in the same order.
Results are per rank; gather them (e.g. all_gather_object) before summarize.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time

import torch
from PIL import Image
from tqdm import tqdm

from recipe.data import IMAGE_TAG, DroppedSample, Reject, ShardDataset, check_image_tags, encode_prompt
from recipe.models import ImageInputs, family_of, load_chat_template, load_image_processor, load_tokenizer, load_vlm

# Text that ends an answer: ChatML end of turn, Qwen2's eos, Llama/Vicuna's eos. Generation also stops on the
# token ids (stop_token_ids); the strings catch them when decoded text is handed in directly.
STOP_STRINGS = ("<|im_end|>", "<|endoftext|>", "</s>")
ARTICLES = {"a", "an", "the"}
UNITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
         "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
TENS = {"twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90}
NUMBER_WORDS = {**{word: n for n, word in enumerate(UNITS)}, **TENS}
# Stripped from both ends of an answer: sentence punctuation and quotes (not "-", which may be a sign).
EDGE_PUNCTUATION = ".,!?;:'\"`"
COMPOUND_NUMBER = re.compile(rf"\b({'|'.join(TENS)})[- ]({'|'.join(UNITS[1:10])})\b")  # "twenty-one", "twenty one"


# ---------------------------------------------------------------------------------------------------
# Answers


def extract_answer(generated_text: str, stop_strings: tuple[str, ...] = STOP_STRINGS) -> str:
    """The answer in generated text: from the first non-blank character up to the first stop string
    (end of turn, eos) or newline, stripped."""
    text = generated_text.lstrip()
    for stop in (*stop_strings, "\n"):
        text = text.split(stop, 1)[0]
    return text.strip()


def normalize_answer(text: str) -> str:
    """Canonical form for exact match: lowercase; punctuation and quotes stripped from both ends of each
    word ("red." == "red", "'3'" == "3"); articles (a, an, the) dropped unless that leaves nothing; number
    words as digits ("three" -> "3", "twenty-one" -> "21"); whitespace collapsed to single spaces."""
    text = COMPOUND_NUMBER.sub(lambda m: str(TENS[m[1]] + UNITS.index(m[2])), text.lower())
    words = [word for word in (w.strip(EDGE_PUNCTUATION) for w in text.split()) if word]
    # An answer that is only an article stays (multiple choice "A" must not match an empty prediction).
    words = [word for word in words if word not in ARTICLES] or words
    return " ".join(str(NUMBER_WORDS.get(word, word)) for word in words)


# ---------------------------------------------------------------------------------------------------
# Generation


def stop_token_ids(model, tokenizer) -> list[int]:
    """Token ids that end an answer: the tokenizer's eos, <|im_end|> when the vocabulary has it (ChatML ends
    turns with it while Qwen2's eos is <|endoftext|>), and whatever the checkpoint's generation config lists."""
    ids = [tokenizer.eos_token_id]
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if im_end is not None and im_end != tokenizer.unk_token_id:
        ids.append(im_end)
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids += configured if isinstance(configured, list) else [configured]
    ids = sorted({i for i in ids if i is not None})
    if not ids:
        raise ValueError("no stop token: the tokenizer has no eos token and the vocabulary no <|im_end|>")
    return ids


def generate_greedy(model, rows: list[dict], *, pad_token_id: int, stop_ids: list[int], max_new_tokens: int,
                    synced_gpus: bool = False) -> list[list[int]]:
    """Greedy continuation of each row, as token ids cut before the first stop token.

    rows: {"input_ids": LongTensor[T], "images": the row's image tensors (the family's image_keys) or None}.
    Prompts are left-padded (generate derives position ids from the attention mask, so padding changes no row's
    positions); images go in for the image rows only, in row order, which is how every family fills image tokens.
    """
    device = model.device
    length = max(len(row["input_ids"]) for row in rows)
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for r, row in enumerate(rows):
        n = len(row["input_ids"])
        input_ids[r, length - n :] = row["input_ids"]
        attention_mask[r, length - n :] = 1
    family = family_of(model)
    images = [row["images"] for row in rows if row["images"] is not None]
    image_inputs = {}
    if images:
        image_inputs = {key: value.to(device, model.dtype) if value.is_floating_point() else value.to(device)
                        for key, value in family.collate_images(images).items()}
        image_inputs.update(family.generation_inputs(model, input_ids.to(device)))
    output = model.generate(
        input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **image_inputs,
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=stop_ids,
        pad_token_id=pad_token_id, synced_gpus=synced_gpus,
        # An image placeholder in an answer is meaningless (and would break a later forward with pixels).
        suppress_tokens=[model.config.image_token_id])
    continuations = []
    for tokens in output[:, length:].tolist():
        cut = next((k for k, token in enumerate(tokens) if token in stop_ids), len(tokens))
        continuations.append(tokens[:cut])
    return continuations


def evaluate_model(model, tokenizer, image_processor, dataset, indices, *, batch_size: int = 16,
                   max_new_tokens: int = 16, synced_gpus: bool = False, progress: bool = True,
                   template: str = "auto", max_length: int | None = None,
                   chat_template: str | None = None) -> list[dict]:
    """Greedy answers to the final question of dataset[i] for i in indices, scored by exact match.

    Returns one {"id", "type", "prediction", "answer", "correct"} per index, in order ("type": the sample's
    "type" field or None; "prediction": the extracted answer, not normalised). A prompt longer than
    max_length (None: no limit) is not generated and scores as wrong, with "dropped": "prompt_too_long".
    synced_gpus: for DeepSpeed ZeRO-3 (see the module docstring); every rank calls this with its own indices
    and the same batch_size. Ignored when torch.distributed is not initialised. image_processor: the model's;
    its family (recipe/models/families) expands each image's token. chat_template: the processor's, for the
    families whose turns are multimodal messages (recipe.models.load_chat_template).
    The model is put in eval mode and given back in the mode it came in.
    """
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size} and {max_new_tokens}")
    indices = list(indices)
    image_token = tokenizer.convert_ids_to_tokens(model.config.image_token_id)
    images = ImageInputs(family=family_of(model), config=model.config, image_processor=image_processor,
                         image_token=image_token)
    prompt_options = dict(image_token=image_token, max_length=max_length, template=template,
                          message_format=images.family.message_format, chat_template=chat_template)
    stop_ids = stop_token_ids(model, tokenizer)
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    synced = synced_gpus and torch.distributed.is_available() and torch.distributed.is_initialized()
    n_batches = math.ceil(len(indices) / batch_size)
    if synced:  # ranks with fewer samples keep calling generate until the busiest rank is done
        count = torch.tensor([n_batches], dtype=torch.long, device=model.device)
        torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
        n_batches = int(count)
    stand_in = None  # built on first need

    results = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), tqdm(total=len(indices), desc="eval", unit="sample", disable=not progress) as bar:
            for b in range(n_batches):
                batch = [_prepare(dataset, i, tokenizer, images, prompt_options)
                         for i in indices[b * batch_size : (b + 1) * batch_size]]
                rows = [sample for sample in batch if "dropped" not in sample]
                if synced and not any(row["images"] is not None for row in rows):
                    stand_in = stand_in or _stand_in_row(tokenizer, images)
                    rows = rows + [stand_in]
                if rows:
                    answers = generate_greedy(model, rows, pad_token_id=pad_token_id, stop_ids=stop_ids,
                                              max_new_tokens=max_new_tokens, synced_gpus=synced)
                    for row, tokens in zip(rows, answers):
                        row["prediction"] = extract_answer(tokenizer.decode(tokens, skip_special_tokens=False))
                for sample in batch:
                    results.append(_score(sample))
                bar.update(len(batch))
    finally:
        model.train(was_training)
    return results


def _prepare(dataset, i: int, tokenizer, images: ImageInputs, prompt_options: dict) -> dict:
    item = dataset[i]
    sample = {"id": item.get("id", i), "type": item.get("type"), "answer": item["conversations"][-1]["value"]}
    text_messages = prompt_options["message_format"] == "text"
    try:
        check_image_tags(item["conversations"], with_image=item.get("image") is not None,
                         image_tag=prompt_options["image_token"] if text_messages else IMAGE_TAG)
    except Reject as error:
        raise ValueError(f"sample {sample['id']!r}: {error}") from None
    image_ids, sample["images"] = [], None
    if item.get("image") is not None:
        text, sample["images"] = images(item["image"])
        image_ids = [tokenizer(text, add_special_tokens=False)["input_ids"]]
    try:
        sample["input_ids"] = encode_prompt(item["conversations"], tokenizer, image_ids=image_ids,
                                            **prompt_options)["input_ids"]
    except DroppedSample as drop:
        sample["dropped"] = drop.reason
    return sample


def _stand_in_row(tokenizer, images: ImageInputs) -> dict:
    """A prompt of one black image's tokens only: keeps the vision tower in every synced batch. Its output is
    thrown away."""
    text, tensors = images(Image.new("RGB", (32, 32)))
    return {"input_ids": torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long),
            "images": tensors}


def _score(sample: dict) -> dict:
    prediction = sample.get("prediction", "")
    result = {"id": sample["id"], "type": sample["type"], "prediction": prediction, "answer": sample["answer"],
              "correct": "dropped" not in sample and normalize_answer(prediction) == normalize_answer(sample["answer"])}
    if "dropped" in sample:
        result["dropped"] = sample["dropped"]
    return result


# ---------------------------------------------------------------------------------------------------
# Summary


def summarize(results: list[dict]) -> dict:
    """{"n", "accuracy", "per_type": {type: {"n", "accuracy"}}} (per_type: samples with a type only, sorted by
    type; empty when none has one). Accuracy of no samples is 0.0."""
    def accuracy(rows):
        return sum(bool(r["correct"]) for r in rows) / len(rows) if rows else 0.0

    by_type = {}
    for r in results:
        if r.get("type") is not None:
            by_type.setdefault(str(r["type"]), []).append(r)
    return {"n": len(results), "accuracy": accuracy(results),
            "per_type": {t: {"n": len(rows), "accuracy": accuracy(rows)} for t, rows in sorted(by_type.items())}}


def format_summary(summary: dict) -> str:
    """e.g. "accuracy 0.734 (220/300) | color 0.95 (40) | digit 0.60 (38)"."""
    correct = round(summary["accuracy"] * summary["n"])
    parts = [f"accuracy {summary['accuracy']:.3f} ({correct}/{summary['n']})"]
    parts += [f"{t} {s['accuracy']:.2f} ({s['n']})" for t, s in summary["per_type"].items()]
    return " | ".join(parts)


# ---------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint directory (any family in docs/families.md)")
    parser.add_argument("--data", required=True, nargs="+", help="shard directories (data_prep/llava_to_shards.py)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-samples", type=int, default=None, help="evaluate the first N samples only")
    parser.add_argument("--out", default=None, help="write the JSON report here")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but CUDA is not available")
    for flag, value in (("--batch-size", args.batch_size), ("--max-new-tokens", args.max_new_tokens),
                        ("--max-samples", args.max_samples)):
        if value is not None and value < 1:
            sys.exit(f"error: {flag} must be >= 1, got {value}")
    try:
        dataset = ShardDataset(args.data)
        model = load_vlm(args.model, precision="bf16" if device == "cuda" else "fp32").to(device)
        tokenizer, image_processor = load_tokenizer(args.model), load_image_processor(args.model)
        indices = range(len(dataset) if args.max_samples is None else min(args.max_samples, len(dataset)))
        chat_template = load_chat_template(args.model) if family_of(model).message_format == "multimodal" else None
        started = time.time()
        results = evaluate_model(model, tokenizer, image_processor, dataset, indices, batch_size=args.batch_size,
                                 max_new_tokens=args.max_new_tokens, chat_template=chat_template)
    except (FileNotFoundError, ValueError, OSError) as error:
        sys.exit(f"error: {error}")
    summary = summarize(results)
    if args.out:
        report = {"model": args.model, "data": args.data, **summary, "samples": results}
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1, ensure_ascii=False)
            f.write("\n")
    print(format_summary(summary))
    print(f"[evaluate] {len(results)} samples in {time.time() - started:.1f}s"
          + (f"; report written to {args.out}" if args.out else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
