"""Tiny random-init VLM presets, written as real checkpoints for tests and the demo.

    python -m recipe.models.tiny --preset PRESET --tokenizer DIR --out DIR [--seed N]

PRESET: demo-teacher, demo-student (LLaVA: SigLIP + Qwen2, the demo's pair), or <model_type>-teacher,
<model_type>-student for model_type in qwen2_vl, qwen2_5_vl, internvl, idefics3, smolvlm, llava_onevision. Each preset
is the family's transformers model class built from its config, saved with `save_pretrained` together with
a copy of the given tokenizer (plus the special tokens the family needs), the family's real image processor
class and its processor settings and chat template, so it loads back through exactly the path a user's
checkpoint takes (AutoModelForImageTextToText, AutoProcessor). Teacher and student of one family share the
vision feature width and image-token counts (the switch pass needs both) and the tokenizer; the teacher's
language model is larger.
"""
from __future__ import annotations

import argparse
import json
import os

import torch
import transformers
from transformers import AutoTokenizer
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

from recipe.models.families import family_of

DEMO = "demo"
FAMILY_PRESETS = ("qwen2_vl", "qwen2_5_vl", "internvl", "idefics3", "smolvlm", "llava_onevision")
ROLES = {
    # text model sizes and vision depth; the vision width and token counts are the family's, equal for both
    "teacher": (dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2), 2),
    "student": (dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2), 2),
}
PRESETS = [f"{kind}-{role}" for kind in (DEMO, *FAMILY_PRESETS) for role in ROLES]


def _model_type(kind: str) -> str:
    return "llava" if kind == DEMO else kind


def preset_tokenizer(kind: str, tokenizer_dir: str):
    """A copy of the tokenizer with the family's special tokens added (those it lacks), as single tokens."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    family = family_of(_model_type(kind))
    vocab = tokenizer.get_vocab()
    missing = [token for token in family.special_tokens if token not in vocab]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    return tokenizer


def build_preset(preset: str, tokenizer):
    """The preset's TinyPreset (config, image processor, processor settings, chat template)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {PRESETS}")
    kind, role = preset.rsplit("-", 1)
    sizes, vision_layers = ROLES[role]
    text = dict(sizes, vocab_size=len(tokenizer), max_position_embeddings=1024, tie_word_embeddings=False,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                bos_token_id=tokenizer.bos_token_id)
    model_type = _model_type(kind)
    family = family_of(model_type)
    return family.tiny(model_type, text, vision_layers, tokenizer)


def build_config(preset: str, tokenizer):
    """The preset's model config (tokenizer: the preset's, see preset_tokenizer)."""
    return build_preset(preset, tokenizer).config


def write_tiny_vlm(preset: str, tokenizer_dir: str, out_dir: str, seed: int = 0) -> str:
    kind = preset.rsplit("-", 1)[0]
    tokenizer = preset_tokenizer(kind, tokenizer_dir)
    spec = build_preset(preset, tokenizer)
    torch.manual_seed(seed)
    model = MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING[type(spec.config)](spec.config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids(spec.end_of_turn)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.chat_template = spec.chat_template
    save_processor(spec, tokenizer, out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def save_processor(spec, tokenizer, out_dir: str) -> None:
    """The family's processor, with save_pretrained. Processors that hold a video processor (Qwen2-VL,
    InternVL, LLaVA-OneVision, SmolVLM) cannot be built without torchvision; then the same processor_config.json
    is written directly (the image processor's settings, the processor's class and settings; the chat template
    is the tokenizer's chat_template.jinja; the video processor's class and settings), from which AutoProcessor
    builds the processor where torchvision is installed."""
    try:
        processor = getattr(transformers, spec.processor_class)(
            image_processor=spec.image_processor, tokenizer=tokenizer, chat_template=spec.chat_template,
            **spec.processor_kwargs)
    except (ImportError, TypeError):  # TypeError: the video processor is missing
        config = {"image_processor": spec.image_processor.to_dict(), "processor_class": spec.processor_class,
                  "video_processor": spec.video_processor, **spec.processor_kwargs}
        with open(os.path.join(out_dir, "processor_config.json"), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        return
    processor.save_pretrained(out_dir)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", required=True, choices=PRESETS)
    parser.add_argument("--tokenizer", required=True, help="tokenizer directory (e.g. DEMO/tokenizer)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    write_tiny_vlm(args.preset, args.tokenizer, args.out, args.seed)
    from recipe.models.loading import load_vlm

    params = sum(p.numel() for p in load_vlm(args.out).parameters())
    print(f"wrote {args.preset} ({params / 1e6:.2f}M parameters) to {args.out}")


if __name__ == "__main__":
    main()
