"""Qwen2-VL and Qwen2.5-VL (Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration).

E = the vision transformer's patch embedding and blocks, P = its patch merger (`model.visual.merger`): the
visual module's forward returns both, E's output as last_hidden_state and P(E) as pooler_output. Images keep
their own resolution inside the processor's pixel bounds: `image_grid_thw` gives each image's patch grid, and
the image has grid.prod() / merge_size**2 tokens. Image embeddings enter L at `<|image_pad|>` tokens, with
M-RoPE position ids computed from the grid by the model's own get_rope_index.

Qwen2.5-VL's blocks attend within windows and keep their output in window order; its merger output is put
back in image order with the inverse of that order, which depends only on the grid and the window, patch and
merge sizes (the pair check compares them).
"""
from __future__ import annotations

import torch
from transformers import Qwen2_5_VLConfig, Qwen2VLConfig
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.vision_utils import get_vision_window_index

from recipe.models.families import Family, TinyPreset, VisionOutput, first_layer_weight_dtype, parameters_of, register

FEATURE_WIDTH = "vision feature width (student E_S output -> teacher projector input)"
# Qwen2-VL's chat format: ChatML with a default system prompt; an image is <|vision_start|><|image_pad|><|vision_end|>.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
PATCH, MERGE = 8, 2


class Qwen2VL(Family):
    name = "Qwen2-VL / Qwen2.5-VL"
    model_types = ("qwen2_vl", "qwen2_5_vl")
    image_keys = ("pixel_values", "image_grid_thw")
    special_tokens = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>")

    def parts(self, vlm):
        visual = vlm.model.visual
        return {"vision": parameters_of(visual.patch_embed, visual.blocks),
                "projector": parameters_of(visual.merger),
                "language": parameters_of(vlm.model.language_model, vlm.lm_head)}

    def encode_images(self, vlm, images):
        visual = vlm.model.visual
        pixels = images["pixel_values"].to(first_layer_weight_dtype(visual.patch_embed))
        out = visual(pixels, grid_thw=images["image_grid_thw"])
        return VisionOutput(features=out.last_hidden_state, embeds=out.pooler_output)

    def project(self, vlm, features, images):
        merged = vlm.model.visual.merger(features)
        if vlm.config.model_type == "qwen2_5_vl":  # the blocks' output is in window order
            vision = vlm.config.vision_config
            window_index, _ = get_vision_window_index(images["image_grid_thw"], vision.spatial_merge_size,
                                                      vision.window_size, vision.patch_size)
            merged = merged[torch.argsort(window_index)]
        return merged

    def position_ids(self, vlm, input_ids, attention_mask, images):
        if images is None:
            return None  # text only: L's default positions, as the model's own forward uses
        image_tokens = (input_ids == vlm.config.image_token_id).int()
        positions, _ = vlm.model.get_rope_index(input_ids, mm_token_type_ids=image_tokens,
                                                image_grid_thw=images["image_grid_thw"], attention_mask=attention_mask)
        return positions

    def generation_inputs(self, vlm, input_ids):
        return {"mm_token_type_ids": (input_ids == vlm.config.image_token_id).int()}

    def stand_in_images(self, vlm):
        vision = vlm.config.vision_config
        merge = vision.spatial_merge_size
        width = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
        return {"pixel_values": torch.zeros((merge * merge, width), device=vlm.device),
                "image_grid_thw": torch.tensor([[1, merge, merge]], device=vlm.device)}

    def image_text(self, config, processed, image_token):
        merge = config.vision_config.spatial_merge_size
        return image_token * int(processed["image_grid_thw"][0].prod() // merge ** 2)

    def tiny(self, model_type, text, vision_layers, tokenizer):
        head_dim = text["hidden_size"] // text["num_attention_heads"]
        quarter = head_dim // 8  # M-RoPE sections (temporal, height, width) over head_dim / 2 frequencies
        text = dict(text, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                           "mrope_section": [head_dim // 2 - 4 * quarter, 2 * quarter, 2 * quarter]})
        vision = dict(depth=vision_layers, num_heads=4, patch_size=PATCH, spatial_merge_size=MERGE,
                      temporal_patch_size=2)
        if model_type == "qwen2_vl":
            vision.update(embed_dim=32, hidden_size=text["hidden_size"], mlp_ratio=2)
            config_class = Qwen2VLConfig
        else:
            vision.update(hidden_size=32, out_hidden_size=text["hidden_size"], intermediate_size=64,
                          window_size=2 * PATCH * MERGE, fullatt_block_indexes=[vision_layers - 1])
            config_class = Qwen2_5_VLConfig
        ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
            ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
        config = config_class(text_config=text, vision_config=vision, **ids)
        # Pixel bounds: 32x32 to 64x64 pixels, i.e. 4 to 16 image tokens per image.
        unit = PATCH * MERGE
        image_processor = Qwen2VLImageProcessorPil(
            size={"shortest_edge": 4 * unit ** 2, "longest_edge": 16 * unit ** 2}, patch_size=PATCH,
            merge_size=MERGE, temporal_patch_size=2)
        return TinyPreset(config=config, image_processor=image_processor,
                          processor_class="Qwen2VLProcessor" if model_type == "qwen2_vl" else "Qwen2_5_VLProcessor",
                          processor_kwargs={}, chat_template=CHAT_TEMPLATE, end_of_turn="<|im_end|>",
                          video_processor={"video_processor_type": "Qwen2VLVideoProcessor", "patch_size": PATCH,
                                           "merge_size": MERGE, "temporal_patch_size": 2,
                                           "size": dict(image_processor.size)})

    def vision_settings(self, config, image_processor=None):
        vision = config.vision_config
        settings = {
            FEATURE_WIDTH: vision.embed_dim if config.model_type == "qwen2_vl" else vision.hidden_size,
            "vision patch size": vision.patch_size,
            "temporal patch size": vision.temporal_patch_size,
            "spatial merge size": vision.spatial_merge_size,
        }
        if config.model_type == "qwen2_5_vl":
            settings["attention window size"] = vision.window_size
        if image_processor is not None:
            size = image_processor.size
            settings["image processor pixel bounds (min, max pixels)"] = (size["shortest_edge"], size["longest_edge"])
            settings["image processor patch and merge size"] = (image_processor.patch_size,
                                                                image_processor.merge_size)
        return settings


register(Qwen2VL())
