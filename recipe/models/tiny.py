"""Tiny random-init VLM presets, written as real checkpoints for tests and the demo.

    python -m recipe.models.tiny --preset demo-teacher|demo-student --tokenizer DIR --out DIR

A preset is a LlavaForConditionalGeneration with a SigLIP vision tower and a Qwen2 language model,
saved with `save_pretrained` together with the tokenizer, a SigLIP image processor and a LlavaProcessor,
so it loads back through exactly the path a user's checkpoint takes. Teacher and student share the vision
feature width and image-token count (the switch pass needs both) and the tokenizer.
"""
from __future__ import annotations

import argparse
import os

import torch
from transformers import (
    AutoTokenizer,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    Qwen2Config,
    SiglipImageProcessor,
    SiglipVisionConfig,
)

IMAGE_TOKEN = "<image>"

# Vision: the same width and token count for every preset; depth may differ.
PRESETS = {
    "demo-teacher": dict(image_size=32, patch_size=8, vision_hidden=64, vision_layers=2, vision_heads=4,
                         text_hidden=128, text_layers=4, text_heads=4, text_kv_heads=2, text_ffn=384),
    "demo-student": dict(image_size=32, patch_size=8, vision_hidden=64, vision_layers=2, vision_heads=4,
                         text_hidden=64, text_layers=2, text_heads=4, text_kv_heads=2, text_ffn=192),
}


def build_config(preset: str, tokenizer) -> LlavaConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_token_id is None or image_token_id == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer has no {IMAGE_TOKEN!r} token; the demo tokenizer adds it as a special token")
    vision = SiglipVisionConfig(hidden_size=p["vision_hidden"], intermediate_size=2 * p["vision_hidden"],
                                num_hidden_layers=p["vision_layers"], num_attention_heads=p["vision_heads"],
                                image_size=p["image_size"], patch_size=p["patch_size"])
    text = Qwen2Config(hidden_size=p["text_hidden"], intermediate_size=p["text_ffn"],
                       num_hidden_layers=p["text_layers"], num_attention_heads=p["text_heads"],
                       num_key_value_heads=p["text_kv_heads"], vocab_size=len(tokenizer),
                       max_position_embeddings=1024, tie_word_embeddings=False,
                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                       bos_token_id=tokenizer.bos_token_id)
    tokens = (p["image_size"] // p["patch_size"]) ** 2
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_token_id,
                       vision_feature_select_strategy="full", vision_feature_layer=-1,
                       projector_hidden_act="gelu", image_seq_length=tokens,
                       pad_token_id=tokenizer.pad_token_id)


def write_tiny_vlm(preset: str, tokenizer_dir: str, out_dir: str, seed: int = 0) -> str:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = build_config(preset, tokenizer)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    size = config.vision_config.image_size
    image_processor = SiglipImageProcessor(size={"height": size, "width": size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                               patch_size=config.vision_config.patch_size,
                               vision_feature_select_strategy=config.vision_feature_select_strategy,
                               image_token=IMAGE_TOKEN, num_additional_image_tokens=0,
                               chat_template=tokenizer.chat_template)
    processor.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS))
    parser.add_argument("--tokenizer", required=True, help="tokenizer directory (e.g. DEMO/tokenizer)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    write_tiny_vlm(args.preset, args.tokenizer, args.out, args.seed)
    params = sum(p.numel() for p in LlavaForConditionalGeneration.from_pretrained(args.out).parameters())
    print(f"wrote {args.preset} ({params / 1e6:.2f}M parameters) to {args.out}")


if __name__ == "__main__":
    main()
