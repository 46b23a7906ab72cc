"""Loading teacher and student VLMs (LlavaForConditionalGeneration family) from local directories."""
from __future__ import annotations

import importlib.util
import json
import os

import torch
import transformers
from transformers import AutoImageProcessor, AutoTokenizer, LlavaForConditionalGeneration

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_attention(requested: str = "auto", precision: str = "bf16") -> str:
    """flash_attention_2 when installed, on CUDA and in 16-bit precision (it has no fp32 kernels), else
    SDPA; an explicit request is honoured."""
    if requested != "auto":
        return requested
    if (precision in ("bf16", "fp16") and torch.cuda.is_available()
            and importlib.util.find_spec("flash_attn") is not None):
        return "flash_attention_2"
    return "sdpa"


def load_vlm(path: str, *, precision: str = "fp32", attention: str = "auto") -> LlavaForConditionalGeneration:
    """A VLM checkpoint directory written by `save_pretrained` (ours or a user's)."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"no model checkpoint at {path!r} (expected {path}/config.json)")
    if precision not in DTYPES:
        raise ValueError(f"precision must be one of {sorted(DTYPES)}, got {precision!r}")
    return LlavaForConditionalGeneration.from_pretrained(
        path, dtype=DTYPES[precision], attn_implementation=pick_attention(attention, precision))


def load_tokenizer(path: str):
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as error:  # no tokenizer files, or ones transformers cannot read
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise FileNotFoundError(f"no usable tokenizer in {path!r} (save it next to the model): {reason}") from None


def load_image_processor(path: str):
    """The checkpoint's image processor. transformers' Auto class insists on torchvision, which a CPU
    install may lack; the named class falls back to its PIL implementation there."""
    try:
        return AutoImageProcessor.from_pretrained(path)
    except ImportError:
        pass
    for name in ("preprocessor_config.json", "processor_config.json"):
        file = os.path.join(path, name)
        if os.path.isfile(file):
            with open(file) as f:
                config = json.load(f)
            config = config.get("image_processor", config)
            if "image_processor_type" in config:
                return getattr(transformers, config["image_processor_type"]).from_pretrained(path)
    raise FileNotFoundError(f"no image processor config in {path!r} "
                            "(preprocessor_config.json or processor_config.json)")


def same_preprocessing(a, b) -> bool:
    """Whether two image processors turn every image into the same pixel values: the same settings,
    whatever the class name (e.g. a fast and a slow variant)."""
    def settings(processor):
        return {k: v for k, v in processor.to_dict().items() if k not in ("image_processor_type", "processor_class")}
    return settings(a) == settings(b)


def vision_feature_layers(config) -> list[int]:
    layer = config.vision_feature_layer
    return [layer] if isinstance(layer, int) else list(layer)


def vision_feature_width(config) -> int:
    """Width of what the projector receives: hidden size times the number of selected layers."""
    return config.vision_config.hidden_size * len(vision_feature_layers(config))


def image_token_count(config) -> int:
    """Image tokens per image as the projector emits them (one per selected vision position)."""
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    has_cls = vision.model_type.startswith("clip")
    # "default" drops the first position (CLIP's class token); "full" keeps all.
    dropped = 1 if config.vision_feature_select_strategy == "default" else 0
    return patches + int(has_cls) - dropped
