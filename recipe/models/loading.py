"""Loading teacher and student VLMs (any family in recipe/models/families) from local directories."""
from __future__ import annotations

import importlib
import importlib.util
import json
import os

import torch
import transformers
from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer
from transformers.models.auto.configuration_auto import model_type_to_module_name
from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES

from recipe.models.families import ImageInputs, family_of

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


def load_vlm(path: str, *, precision: str = "fp32", attention: str = "auto"):
    """A VLM checkpoint directory written by `save_pretrained` (ours or a user's), through transformers'
    AutoModelForImageTextToText; its family (config.model_type) must have an adapter."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"no model checkpoint at {path!r} (expected {path}/config.json)")
    if precision not in DTYPES:
        raise ValueError(f"precision must be one of {sorted(DTYPES)}, got {precision!r}")
    family_of(AutoConfig.from_pretrained(path))  # an unsupported family stops here, before any weights load
    return AutoModelForImageTextToText.from_pretrained(
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
                return _pil_image_processor_class(config["image_processor_type"]).from_pretrained(path)
    raise FileNotFoundError(f"no image processor config in {path!r} "
                            "(preprocessor_config.json or processor_config.json)")


def _pil_image_processor_class(name: str):
    """The PIL implementation of an image processor class named in a config (e.g. "Qwen2VLImageProcessor" ->
    Qwen2VLImageProcessorPil), imported from its own module: transformers' top-level names of some of them stand
    in for the torchvision one when torchvision is missing."""
    base = name.removesuffix("Pil")
    for model_type, classes in IMAGE_PROCESSOR_MAPPING_NAMES.items():
        if base in classes.values() or base + "Pil" in classes.values():
            module = model_type_to_module_name(model_type)
            try:
                return getattr(importlib.import_module(f"transformers.models.{module}.image_processing_pil_{module}"),
                               base + "Pil")
            except (ImportError, AttributeError):
                continue
    return getattr(transformers, name)


def load_chat_template(path: str) -> str | None:
    """The chat template the checkpoint's processor carries (chat_template.jinja, chat_template.json or
    processor_config.json; the tokenizer's chat template is the tokenizer's own), or None."""
    jinja = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja) as f:
            return f.read()
    for name in ("chat_template.json", "processor_config.json"):
        file = os.path.join(path, name)
        if os.path.isfile(file):
            with open(file) as f:
                template = json.load(f).get("chat_template")
            if template:
                return template
    return None


def load_image_inputs(path: str, config=None, tokenizer=None) -> ImageInputs:
    """The data side of the checkpoint's images (its family, config, image processor and image token)."""
    config = config if config is not None else AutoConfig.from_pretrained(path)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(path)
    return ImageInputs(family=family_of(config), config=config, image_processor=load_image_processor(path),
                       image_token=tokenizer.convert_ids_to_tokens(config.image_token_id))


def same_preprocessing(a, b) -> bool:
    """Whether two image processors turn every image into the same pixel values: the same settings,
    whatever the class name (e.g. a fast and a slow variant)."""
    def settings(processor):
        return {k: v for k, v in processor.to_dict().items() if k not in ("image_processor_type", "processor_class")}
    return settings(a) == settings(b)
