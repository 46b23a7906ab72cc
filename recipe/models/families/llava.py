"""LLaVA (LlavaForConditionalGeneration): E = the vision tower at `vision_feature_layer` with
`vision_feature_select_strategy` applied, P = the multimodal projector; every image gives the same number of
tokens, one `<image>` copy each."""
from __future__ import annotations

import torch
from transformers import LlavaConfig, Qwen2Config, SiglipImageProcessor, SiglipVisionConfig

from recipe.models.families import Family, TinyPreset, VisionOutput, first_layer_weight_dtype, parameters_of, register

TINY_VISION = dict(image_size=32, patch_size=8, hidden_size=64, intermediate_size=128, num_attention_heads=4)


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


def selected_features(vlm, pixel_values: torch.Tensor) -> torch.Tensor:
    """The vision tower's hidden states at the configured layers, concatenated, with the select strategy
    applied: (images or tiles, tokens, feature width). Shared with LLaVA-OneVision."""
    config = vlm.config
    tower = vlm.model.vision_tower
    outputs = tower(pixel_values.to(first_layer_weight_dtype(tower)), output_hidden_states=True, return_dict=True)
    selected = [outputs.hidden_states[layer] for layer in vision_feature_layers(config)]
    if config.vision_feature_select_strategy == "default":
        selected = [hidden[:, 1:] for hidden in selected]
    return torch.cat(selected, dim=-1)


class Llava(Family):
    name = "LLaVA"
    model_types = ("llava",)
    message_format = "text"
    special_tokens = ("<image>",)

    def parts(self, vlm):
        return {"vision": parameters_of(vlm.model.vision_tower),
                "projector": parameters_of(vlm.model.multi_modal_projector),
                "language": parameters_of(vlm.model.language_model, vlm.lm_head)}

    def encode_images(self, vlm, images):
        features = selected_features(vlm, images["pixel_values"])
        return VisionOutput(features=features, embeds=self.project(vlm, features, images))

    def project(self, vlm, features, images):
        return vlm.model.multi_modal_projector(features).flatten(0, 1)

    def stand_in_images(self, vlm):
        size = vlm.config.vision_config.image_size
        return {"pixel_values": torch.zeros((1, 3, size, size), device=vlm.device)}

    def image_text(self, config, processed, image_token):
        return image_token * image_token_count(config)

    def tiny(self, model_type, text, vision_layers, tokenizer):
        from recipe.data.conversation import multimodal_chat_template

        vision = SiglipVisionConfig(num_hidden_layers=vision_layers, **TINY_VISION)
        config = LlavaConfig(vision_config=vision, text_config=Qwen2Config(**text),
                             image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                             vision_feature_select_strategy="full", vision_feature_layer=-1,
                             projector_hidden_act="gelu", pad_token_id=tokenizer.pad_token_id,
                             image_seq_length=(vision.image_size // vision.patch_size) ** 2)
        size = vision.image_size
        # The demo tokenizer's ChatML, taking multimodal messages too (plain strings render as before).
        return TinyPreset(config=config, image_processor=SiglipImageProcessor(size={"height": size, "width": size}),
                          processor_class="LlavaProcessor",
                          processor_kwargs=dict(patch_size=vision.patch_size, vision_feature_select_strategy="full",
                                                image_token="<image>", num_additional_image_tokens=0),
                          chat_template=multimodal_chat_template(tokenizer.chat_template), end_of_turn="<|im_end|>")

    def vision_settings(self, config, image_processor=None):
        return {"vision feature width (student E_S output -> teacher projector input)": vision_feature_width(config),
                "image tokens per image": image_token_count(config)}


register(Llava())
