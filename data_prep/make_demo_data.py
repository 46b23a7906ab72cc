"""Build the embedded demo: a small visual question answering set a tiny VLM can learn on a CPU.

    python data_prep/make_demo_data.py --out DIR [--n-train 3000] [--n-eval 1500] [--seed 0] [--image-size 32]

Writes
  DIR/raw/{train,eval}.json + DIR/raw/images/{train,eval}/*.png   LLaVA format
  DIR/train, DIR/eval        shards, converted with the same code as llava_to_shards.py
  DIR/tokenizer              byte-level BPE trained on the demo texts, ChatML (Qwen2) chat template,
                             special tokens <|endoftext|> (pad/eos), <|im_start|>, <|im_end|>, <image>

Scenes: (a) real handwritten digits (scikit-learn's 8x8 digits, upscaled, white on black) and
(b) coloured shapes drawn with PIL on black. Questions are templated, answers are one word or a
number. Most question types need the image (digit identity, colour, shape), which is what the
distillation transfers; text-only arithmetic is the part a language model alone can learn.
Every sample has "type" (the type of its last question, the one an evaluation scores) and
"round_types" (one per question); some samples ask two questions about one image.
Train and eval use disjoint digit images and disjoint arithmetic questions, and no
(image bytes, questions) pair of eval appears in train. Same seed, same bytes.

The eval split is stratified: within each question type every answer is scored equally often (to within
one; arithmetic: every held-out question equally often), so a student that gives one answer to every
question of a type scores that type's chance level whichever answer it settled on. Its scenes come from
the same generator as train's, redrawn until the scored answer is the one due. 1,500 questions by default:
one run's binomial standard error is at most 1.3 points. The train split does not depend on --n-eval.
"""

import argparse
import hashlib
import io
import json
import os
import random
import sys
import time

import numpy as np
from PIL import Image, ImageChops, ImageDraw

from recipe.data.shards import convert_to_shards  # noqa: E402

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "purple": (160, 60, 210),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("left", "right", "top", "bottom")
MAX_COUNT = 3  # scenes of 1..MAX_COUNT shapes or digits

QUESTIONS = {
    "color": "What color is the shape?",
    "shape": "What shape is it?",
    "shape_count": "How many shapes are there?",
    "position": "Where is the shape?",
    "digit": "Which digit is shown?",
    "digit_count": "How many digits are there?",
    "digit_left": "Which digit is on the left?",
    "digit_right": "Which digit is on the right?",
    "digit_sum": "What is the sum of the digits?",
}

# Sample kinds: (share of the data, scene, question types). "*_multi" kinds ask two questions
# about one image (the second without <image>), so label masking over several turns is exercised.
KINDS = {
    "color": (14, "one_shape", ["color"]),
    "shape": (14, "one_shape", ["shape"]),
    "shape_multi": (8, "one_shape", ["color", "shape"]),
    "shape_count": (10, "shapes", ["shape_count"]),
    "position": (10, "placed_shape", ["position"]),
    "digit": (20, "one_digit", ["digit"]),
    "digit_count": (8, "digits", ["digit_count"]),
    "digit_pair": (6, "digit_pair", ["digit_left", "digit_right"]),
    "arithmetic": (10, None, ["arithmetic"]),
}

EVAL_SHARE = 0.2  # of the digit images and of the arithmetic questions, held out for eval
SUPERSAMPLE = 4  # shapes are drawn 4x larger and box-filtered down: anti-aliased edges at 32 px
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]


# ---------------------------------------------------------------------------------------------------
# Scenes: (rng, size, digits) -> (RGB image, facts). Facts hold the answer to every question type.


def _jittered(rng: random.Random, rgb: tuple) -> tuple:
    return tuple(min(255, max(0, c + rng.randint(-20, 20))) for c in rgb)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, side: float, color: tuple) -> None:
    half = side / 2
    if shape == "circle":
        draw.ellipse((cx - half, cy - half, cx + half, cy + half), fill=color)
    elif shape == "square":
        draw.rectangle((cx - half, cy - half, cx + half, cy + half), fill=color)
    else:
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=color)


def _shape_scene(size: int, shapes: list[tuple]) -> Image.Image:
    """shapes: (shape, colour rgb, cx, cy, side) in fractions of the image size."""
    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big))
    draw = ImageDraw.Draw(image)
    for shape, color, cx, cy, side in shapes:
        _draw_shape(draw, shape, cx * big, cy * big, side * big, color)
    return image.resize((size, size), Image.Resampling.BOX)


def one_shape(rng, size, digits):
    color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
    side = rng.uniform(0.5, 0.75)
    cx, cy = (rng.uniform(side / 2 + 0.02, 0.98 - side / 2) for _ in range(2))
    image = _shape_scene(size, [(shape, _jittered(rng, COLORS[color]), cx, cy, side)])
    return image, {"color": color, "shape": shape}


def placed_shape(rng, size, digits):
    position = rng.choice(POSITIONS)
    side = rng.uniform(0.28, 0.36)
    along, across = 0.5 + rng.uniform(-0.12, 0.12), rng.uniform(0.18, 0.22)
    cx, cy = {
        "left": (across, along),
        "right": (1 - across, along),
        "top": (along, across),
        "bottom": (along, 1 - across),
    }[position]
    color = _jittered(rng, COLORS[rng.choice(list(COLORS))])
    return _shape_scene(size, [(rng.choice(SHAPES), color, cx, cy, side)]), {"position": position}


def shapes(rng, size, digits):
    """1-3 shapes in distinct cells of a 3x3 grid."""
    count = rng.randint(1, MAX_COUNT)
    placed = []
    for cell in rng.sample(range(9), count):
        side = rng.uniform(0.2, 0.27)
        cx = (cell % 3 + 0.5) / 3 + rng.uniform(-0.02, 0.02)
        cy = (cell // 3 + 0.5) / 3 + rng.uniform(-0.02, 0.02)
        placed.append((rng.choice(SHAPES), _jittered(rng, COLORS[rng.choice(list(COLORS))]), cx, cy, side))
    return _shape_scene(size, placed), {"shape_count": str(count)}


def _digit_scene(size: int, placed: list[tuple]) -> Image.Image:
    """placed: (8x8 digit array with values 0..16, x, y, side) in pixels; white ink on black."""
    canvas = Image.new("L", (size, size))
    for pixels, x, y, side in placed:
        glyph = Image.fromarray(np.uint8(pixels * (255 / 16))).resize((side, side), Image.Resampling.BILINEAR)
        layer = Image.new("L", (size, size))
        layer.paste(glyph, (x, y))
        canvas = ImageChops.lighter(canvas, layer)
    return canvas.convert("RGB")


def one_digit(rng, size, digits):
    pixels, label = rng.choice(digits)
    side = round(size * rng.uniform(0.65, 0.85))
    x, y = rng.randint(0, size - side), rng.randint(0, size - side)
    return _digit_scene(size, [(pixels, x, y, side)]), {"digit": str(label)}


def digit_pair(rng, size, digits):
    (left, left_label), (right, right_label) = rng.choice(digits), rng.choice(digits)
    side = round(size * 0.47)
    half = size // 2
    placed = [
        (left, rng.randint(0, half - side), rng.randint(0, size - side), side),
        (right, rng.randint(half, size - side), rng.randint(0, size - side), side),
    ]
    facts = {"digit_left": str(left_label), "digit_right": str(right_label), "digit_sum": str(left_label + right_label)}
    return _digit_scene(size, placed), facts


def digits_scene(rng, size, digits):
    """1-3 small digits in distinct cells of a 3x3 grid."""
    count = rng.randint(1, MAX_COUNT)
    cell = size / 3
    side = max(4, round(cell * 0.95))
    placed = []
    for index in rng.sample(range(9), count):
        x = min(size - side, max(0, round((index % 3) * cell + rng.uniform(-1, 1))))
        y = min(size - side, max(0, round((index // 3) * cell + rng.uniform(-1, 1))))
        placed.append((rng.choice(digits)[0], x, y, side))
    return _digit_scene(size, placed), {"digit_count": str(count)}


SCENES = {
    "one_shape": one_shape,
    "placed_shape": placed_shape,
    "shapes": shapes,
    "one_digit": one_digit,
    "digit_pair": digit_pair,
    "digits": digits_scene,
}


# ---------------------------------------------------------------------------------------------------
# Samples


def arithmetic_questions() -> list[tuple[str, str]]:
    """All single-digit "a plus b" and "a minus b" (a >= b) questions with their answers."""
    questions = [(f"What is {a} plus {b}?", str(a + b)) for a in range(10) for b in range(10)]
    questions += [(f"What is {a} minus {b}?", str(a - b)) for a in range(10) for b in range(a + 1)]
    return questions


def split_holdout(items: list, seed: int) -> tuple[list, list]:
    """(train part, eval part): a fixed random EVAL_SHARE of items goes to eval."""
    items = list(items)
    random.Random(f"{seed}-holdout").shuffle(items)
    n_eval = max(1, round(len(items) * EVAL_SHARE))
    return items[n_eval:], items[:n_eval]


def kind_schedule(n: int, rng: random.Random) -> list[str]:
    """n sample kinds in the KINDS proportions (largest remainder), shuffled."""
    total = sum(share for share, _, _ in KINDS.values())
    exact = {kind: n * share / total for kind, (share, _, _) in KINDS.items()}
    counts = {kind: int(x) for kind, x in exact.items()}
    for kind in sorted(exact, key=lambda k: exact[k] - counts[k], reverse=True)[: n - sum(counts.values())]:
        counts[kind] += 1
    schedule = [kind for kind in KINDS for _ in range(counts[kind])]
    rng.shuffle(schedule)
    return schedule


def make_sample(kind: str, rng: random.Random, size: int, digits: list, arithmetic: list):
    """(conversations, round types, image or None) of one sample of this kind."""
    _, scene, types = KINDS[kind]
    if scene is None:
        question, answer = rng.choice(arithmetic)
        return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}], types, None
    image, facts = SCENES[scene](rng, size, digits)
    if kind.endswith("_multi"):
        types = rng.sample(types, 2)
    conversations = []
    for round_index, question_type in enumerate(types):
        question = QUESTIONS[question_type]
        conversations.append({"from": "human", "value": f"<image>\n{question}" if round_index == 0 else question})
        conversations.append({"from": "gpt", "value": facts[question_type]})
    return conversations, types, image


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def sample_fingerprint(image_bytes: bytes, conversations: list) -> str:
    questions = "\n".join(turn["value"] for turn in conversations if turn["from"] == "human")
    return hashlib.sha256(image_bytes + b"\0" + questions.encode()).hexdigest()


def eval_strata(digits: list, arithmetic: list) -> dict[str, list[str]]:
    """Per question type a sample can end with, the values the eval split balances: the answers it can have (the digits
    of the eval pool), or for arithmetic the held-out questions themselves."""
    labels = sorted({str(label) for _, label in digits})
    counts = [str(n) for n in range(1, MAX_COUNT + 1)]
    return {"color": list(COLORS), "shape": list(SHAPES), "position": list(POSITIONS), "shape_count": counts,
            "digit_count": counts, "digit": labels, "digit_right": labels,
            "arithmetic": [question for question, _ in arithmetic]}


def stratum(conversations: list, types: list) -> tuple[str, str]:
    """(scored question type, the value the eval split balances for it) of one sample."""
    if types[-1] == "arithmetic":
        return "arithmetic", conversations[-2]["value"]
    return types[-1], conversations[-1]["value"]


def build_split(split: str, n: int, seed: int, size: int, digits: list, arithmetic: list, raw_dir: str, avoid: set,
                strata: dict | None = None):
    """Write n samples' images and return (records, fingerprints). Samples whose
    (image, questions) fingerprint is in `avoid` are redrawn. With strata (eval_strata), so are samples whose
    stratum has been scored more often than another of their type: each type's strata come out balanced."""
    rng = random.Random(f"{seed}-{split}")
    image_dir = os.path.join(raw_dir, "images", split)
    os.makedirs(image_dir, exist_ok=True)
    records, fingerprints = [], set()
    counts = {kind: dict.fromkeys(values, 0) for kind, values in (strata or {}).items()}
    for i, kind in enumerate(kind_schedule(n, rng)):
        for _ in range(1000):
            conversations, types, image = make_sample(kind, rng, size, digits, arithmetic)
            data = png_bytes(image) if image is not None else b""
            fingerprint = sample_fingerprint(data, conversations)
            scored, value = stratum(conversations, types)
            due = strata is None or counts[scored][value] == min(counts[scored].values())
            if due and fingerprint not in avoid:
                break
        else:
            raise RuntimeError(f"no {kind} sample for {split} that is not in train"
                               f"{' and scores the answer due' if strata else ''}; use a larger --image-size")
        if strata is not None:
            counts[scored][value] += 1
        fingerprints.add(fingerprint)
        record = {"id": f"{split}-{i:06d}"}
        if image is not None:
            record["image"] = f"{split}/{i:06d}.png"
            with open(os.path.join(image_dir, f"{i:06d}.png"), "wb") as f:
                f.write(data)
        record.update(conversations=conversations, type=types[-1], round_types=types)
        records.append(record)
    with open(os.path.join(raw_dir, f"{split}.json"), "w", encoding="utf-8") as f:
        json.dump(records, f, indent=1)
    return records, fingerprints


def load_digit_splits(seed: int) -> tuple[list, list]:
    """scikit-learn's 1797 real handwritten digits (8x8, 0..16), split by image into train/eval pools."""
    from sklearn.datasets import load_digits

    data = load_digits()
    pool = [(data.images[i], int(data.target[i])) for i in range(len(data.target))]
    return split_holdout(pool, seed)


# ---------------------------------------------------------------------------------------------------
# Tokenizer


def train_tokenizer(texts: list[str], out_dir: str, vocab_size: int = 512):
    """Byte-level BPE on the demo texts, saved as a transformers fast tokenizer with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # any byte stays encodable
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
        model_max_length=2048,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def tokenizer_corpus(records: list) -> list[str]:
    """The training texts, each rendered as the model will see it (role names, system prompt, tags)."""
    texts = []
    for record in records:
        chat = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        for turn in record["conversations"]:
            role = "user" if turn["from"] == "human" else "assistant"
            chat += f"<|im_start|>{role}\n{turn['value']}<|im_end|>\n"
        texts.append(chat)
    return texts


# ---------------------------------------------------------------------------------------------------


def build_demo(out: str, *, n_train: int = 3000, n_eval: int = 1500, seed: int = 0, image_size: int = 32) -> dict:
    if n_train < 1 or n_eval < 1:
        raise ValueError("--n-train and --n-eval must be >= 1")
    if image_size < 16:
        raise ValueError(f"--image-size {image_size} is too small for recognisable scenes (minimum 16)")
    raw_dir = os.path.join(out, "raw")
    train_digits, eval_digits = load_digit_splits(seed)
    train_arithmetic, eval_arithmetic = split_holdout(arithmetic_questions(), seed)
    train_records, train_fingerprints = build_split(
        "train", n_train, seed, image_size, train_digits, train_arithmetic, raw_dir, avoid=set()
    )
    eval_records, eval_fingerprints = build_split(
        "eval", n_eval, seed, image_size, eval_digits, eval_arithmetic, raw_dir, avoid=train_fingerprints,
        strata=eval_strata(eval_digits, eval_arithmetic),
    )
    assert not train_fingerprints & eval_fingerprints
    image_root = os.path.join(raw_dir, "images")
    for split in ("train", "eval"):
        convert_to_shards(os.path.join(raw_dir, f"{split}.json"), image_root, os.path.join(out, split), progress=False)
    tokenizer = train_tokenizer(tokenizer_corpus(train_records), os.path.join(out, "tokenizer"))
    return {"train": len(train_records), "eval": len(eval_records), "vocab_size": len(tokenizer)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--n-train", type=int, default=3000)
    parser.add_argument("--n-eval", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=32)
    args = parser.parse_args(argv)
    start = time.time()
    try:
        result = build_demo(
            args.out, n_train=args.n_train, n_eval=args.n_eval, seed=args.seed, image_size=args.image_size
        )
    except ValueError as error:
        print(f"make_demo_data: error: {error}", file=sys.stderr)
        return 2
    print(
        f"demo data: {result['train']} train + {result['eval']} eval samples ({args.image_size}px, seed {args.seed}), "
        f"tokenizer vocab {result['vocab_size']} -> {args.out} in {time.time() - start:.1f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
