"""One adapter per VLM family: where E ends and P begins, how image embeddings enter L, and how an image
becomes placeholder tokens and tensors (docs/method.md, "Models"; docs/families.md).

Everything model-specific that the three passes, the collator, evaluation, export and the pair check need
goes through `Family`. A family module subclasses it and registers an instance under the `config.model_type`
values it serves; `family_of(config)` finds it. Adding a family means one module in this package (listed in
FAMILY_MODULES) and its tests.

Every submodule is called through its forward (never through its .weight) so that ZeRO-3 gathers partitioned
parameters on the way.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

FAMILY_MODULES = ("llava", "qwen2_vl", "internvl", "idefics3", "llava_onevision")
_REGISTRY: dict[str, Family] = {}


@dataclass
class VisionOutput:
    """One model's vision path on a batch of images."""
    features: torch.Tensor  # E(image), exactly what this model's P takes (the switch pass hands it to P_T)
    embeds: torch.Tensor  # P(E(image)) as L takes it: (image tokens of all images, text hidden), in token order


@dataclass
class TinyPreset:
    """What `python -m recipe.models.tiny` writes for a family (recipe/models/tiny.py saves it)."""
    config: Any  # the family's transformers config, random-init sizes
    image_processor: Any  # the family's real image processor class (its PIL implementation)
    processor_class: str  # the family's transformers processor class
    processor_kwargs: dict  # that processor's other settings (written to processor_config.json)
    chat_template: str  # the family's chat template format; takes plain-string and multimodal content
    end_of_turn: str  # the token generation stops at
    video_processor: dict | None = None  # the processor's video processor settings, for processors that have one


class Family:
    """The interface every family implements. Methods take the model (`vlm`, a *ForConditionalGeneration) or its
    config; `images` is the dict of image tensors the collator built (`image_keys`, the model's own input names)."""

    name = ""  # what messages call the family
    model_types: tuple[str, ...] = ()  # config.model_type values this adapter serves
    image_keys: tuple[str, ...] = ("pixel_values",)  # the image processor outputs the model takes, batch keys too
    # The text of the LLaVA turns: "text" keeps the `<image>` tag in plain-string content (rendered by the
    # tokenizer's template); "multimodal" turns it into HF's {"type": "image"} content items, which the model's
    # own chat template places.
    message_format = "multimodal"
    special_tokens: tuple[str, ...] = ()  # tokens the tokenizer must have as single tokens (tiny presets add them)

    # ---- E, P and L
    def parts(self, vlm) -> dict[str, list[nn.Parameter]]:
        """The parameters of E ("vision"), P ("projector") and L with its head ("language")."""
        raise NotImplementedError

    def language_model(self, vlm) -> nn.Module:
        """L's decoder (without the LM head): takes inputs_embeds, returns last_hidden_state."""
        return vlm.model.language_model

    def encode_images(self, vlm, images: dict) -> VisionOutput:
        raise NotImplementedError

    def project(self, vlm, features: torch.Tensor, images: dict) -> torch.Tensor:
        """This model's P (and whatever the family does after it) on E features, possibly another model's."""
        raise NotImplementedError

    def position_ids(self, vlm, input_ids, attention_mask, images: dict | None) -> torch.Tensor | None:
        """Position ids for L when the family computes its own (Qwen's M-RoPE); None: L's default."""
        return None

    def generation_inputs(self, vlm, input_ids) -> dict:
        """What generate needs beside the image tensors (Qwen's mm_token_type_ids for M-RoPE)."""
        return {}

    def stand_in_images(self, vlm) -> dict:
        """Image tensors of one black image, built from the config alone (see switch.stand_in_images)."""
        raise NotImplementedError

    # ---- data: an image -> tensors and the text its placeholder token expands to
    def process_image(self, image_processor, image) -> dict:
        """The image processor's tensors for one image (the `image_keys` and what image_text reads)."""
        out = image_processor(images=[image], return_tensors="pt")
        return dict(out)

    def image_text(self, config, processed: dict, image_token: str) -> str:
        """The text that replaces the one image token (`image_token`, the tokenizer's token for
        config.image_token_id) that the chat template placed for this image: what the family's processor
        (replace_image_token) puts there. Its image-token count is the number of embeddings P emits."""
        raise NotImplementedError

    def collate_images(self, parts: list[dict]) -> dict:
        """Per-image tensors (image_keys only) -> the batch's, in image order."""
        return {key: torch.cat([p[key] for p in parts]) for key in self.image_keys}

    # ---- the pair check
    def vision_settings(self, config, image_processor=None) -> dict[str, Any]:
        """Everything that must agree between teacher and student for P_T to take E_S's output: the feature width
        and what fixes the image-token count (patch size, merge factor, pixel bounds...), named for the message.
        With the image processor, its settings too."""
        raise NotImplementedError

    # ---- tiny presets (recipe/models/tiny.py)
    def tiny(self, model_type: str, text: dict, vision_layers: int, tokenizer) -> TinyPreset:
        """A tiny random-init model of this family: `text` holds the language model's sizes (Qwen2Config/LlamaConfig
        keyword arguments, vocabulary and special ids included); the vision sizes are the family's own and the
        same for every role (the switch pass needs equal widths and token counts), except vision_layers."""
        raise NotImplementedError


@dataclass
class ImageInputs:
    """One model's data side, for the collator and evaluation: an image -> (the text its image token expands to,
    its tensors). Plain data, so it travels into DataLoader workers."""
    family: Family
    config: Any  # the model config
    image_processor: Any
    image_token: str

    def __call__(self, image) -> tuple[str, dict]:
        processed = self.family.process_image(self.image_processor, image)
        text = self.family.image_text(self.config, processed, self.image_token)
        return text, {key: processed[key] for key in self.family.image_keys}

    def collate(self, parts: list[dict]) -> dict:
        return self.family.collate_images(parts)


def register(family: Family) -> Family:
    for model_type in family.model_types:
        _REGISTRY[model_type] = family
    return family


def _load_all() -> None:
    for name in FAMILY_MODULES:  # each registers itself on first import
        importlib.import_module(f"recipe.models.families.{name}")


def family_of(model) -> Family:
    """The adapter for a model, its config or its model_type (config.model_type)."""
    _load_all()
    model_type = model if isinstance(model, str) else getattr(getattr(model, "config", model), "model_type", None)
    if model_type not in _REGISTRY:
        raise ValueError(f"model type {model_type!r} is not supported; supported: {sorted(_REGISTRY)} "
                         f"(docs/families.md says how to add a family)")
    return _REGISTRY[model_type]


def parameters_of(*modules: nn.Module) -> list[nn.Parameter]:
    return [p for module in modules for p in module.parameters()]


def scatter_image_embeds(vlm, input_ids: torch.Tensor, embeds: torch.Tensor | None, pass_name: str) -> torch.Tensor:
    """Token embeddings of input_ids with the image embeddings placed at the image-token positions, in order."""
    image_mask = input_ids == vlm.config.image_token_id
    tokens = vlm.get_input_embeddings()(input_ids.masked_fill(image_mask, 0))
    slots = int(image_mask.sum())
    given = 0 if embeds is None else embeds.shape[0]
    if slots != given:
        raise ValueError(f"{pass_name}: the text has {slots} image-token positions but the projector gave {given} "
                         f"image embeddings (the processor's image-token count and the model's disagree)")
    if embeds is None:
        return tokens
    return tokens.masked_scatter(image_mask[..., None], embeds.to(tokens.dtype))


def language_hidden(vlm, input_ids, attention_mask, embeds: torch.Tensor | None, images: dict | None,
                    pass_name: str = "pass") -> torch.Tensor:
    """L's last hidden states on the text, with image embeddings at the image tokens (None: no image)."""
    family = family_of(vlm)
    inputs_embeds = scatter_image_embeds(vlm, input_ids, embeds, pass_name)
    position_ids = family.position_ids(vlm, input_ids, attention_mask, images if embeds is not None else None)
    outputs = family.language_model(vlm)(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                         position_ids=position_ids, use_cache=False)
    return outputs.last_hidden_state


def first_layer_weight_dtype(module: nn.Module) -> torch.dtype:
    """The dtype pixel values enter a vision encoder in (its parameters' dtype)."""
    return next(module.parameters()).dtype
