"""InternVL (InternVLForConditionalGeneration, the transformers port of InternVL 2.5/3).

E = the InternViT vision tower at `vision_feature_layer`, without its class token ("default" strategy);
P = the model's pixel shuffle (`downsample_ratio`) followed by the multimodal projector (LayerNorm + MLP).
Dynamic resolution: the image processor crops an image into 1..max_patches tiles (plus a thumbnail) of the
vision tower's size; each tile gives `image_seq_length` tokens, and the processor writes
`<img>` + `<IMG_CONTEXT>` x (tiles x image_seq_length) + `</img>` where the chat template placed `<IMG_CONTEXT>`.
"""
from __future__ import annotations

import torch
from transformers import InternVLConfig
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

from recipe.models.families import Family, TinyPreset, VisionOutput, first_layer_weight_dtype, parameters_of, register

START_IMAGE, END_IMAGE = "<img>", "</img>"
# InternVL's chat format (its transformers port): ChatML; an image is <IMG_CONTEXT> and a newline.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}{% elif item['type'] == 'text' %}{{ item['text'] }}"
    "{% endif %}{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _side(value) -> int:
    return value[0] if isinstance(value, (list, tuple)) else value


def image_seq_length(config) -> int:
    """Tokens per tile: the vision tower's patches, less the pixel shuffle's downsampling."""
    vision = config.vision_config
    return int((_side(vision.image_size) // _side(vision.patch_size)) ** 2 * config.downsample_ratio ** 2)


class InternVL(Family):
    name = "InternVL"
    model_types = ("internvl",)
    special_tokens = (START_IMAGE, "<IMG_CONTEXT>", END_IMAGE)

    def parts(self, vlm):
        return {"vision": parameters_of(vlm.model.vision_tower),
                "projector": parameters_of(vlm.model.multi_modal_projector),
                "language": parameters_of(vlm.model.language_model, vlm.lm_head)}

    def encode_images(self, vlm, images):
        config, tower = vlm.config, vlm.model.vision_tower
        pixels = images["pixel_values"].to(first_layer_weight_dtype(tower))
        outputs = tower(pixel_values=pixels, output_hidden_states=config.vision_feature_layer != -1, return_dict=True)
        features = (outputs.last_hidden_state if config.vision_feature_layer == -1
                    else outputs.hidden_states[config.vision_feature_layer])
        if config.vision_feature_select_strategy == "default":
            features = features[:, 1:]
        return VisionOutput(features=features, embeds=self.project(vlm, features, images))

    def project(self, vlm, features, images):
        tiles, tokens, width = features.shape
        side = int(tokens ** 0.5)
        shuffled = vlm.model.pixel_shuffle(features.reshape(tiles, side, side, width),
                                           scale_factor=vlm.config.downsample_ratio)
        return vlm.model.multi_modal_projector(shuffled.reshape(tiles, -1, shuffled.shape[-1])).flatten(0, 1)

    def stand_in_images(self, vlm):
        size = _side(vlm.config.vision_config.image_size)
        return {"pixel_values": torch.zeros((1, 3, size, size), device=vlm.device)}

    def image_text(self, config, processed, image_token):
        tiles = processed["pixel_values"].shape[0]
        return START_IMAGE + image_token * (image_seq_length(config) * tiles) + END_IMAGE

    def tiny(self, model_type, text, vision_layers, tokenizer):
        vision = dict(hidden_size=32, num_hidden_layers=vision_layers, num_attention_heads=4, intermediate_size=64,
                      image_size=[32, 32], patch_size=[8, 8])
        config = InternVLConfig(text_config=dict(text, model_type="qwen2"), vision_config=vision,
                                image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"), downsample_ratio=0.5)
        config.image_seq_length = image_seq_length(config)
        # Tiles of 32x32: 1 to 4 of them, plus a thumbnail when there are several.
        image_processor = GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, crop_to_patches=True,
                                                min_patches=1, max_patches=4)
        return TinyPreset(config=config, image_processor=image_processor, processor_class="InternVLProcessor",
                          processor_kwargs={"image_seq_length": config.image_seq_length}, chat_template=CHAT_TEMPLATE,
                          end_of_turn="<|im_end|>", video_processor={"video_processor_type": "InternVLVideoProcessor",
                                                                     "size": {"height": 32, "width": 32}})

    def vision_settings(self, config, image_processor=None):
        vision = config.vision_config
        settings = {
            "vision feature width (student E_S output -> teacher projector input)": vision.hidden_size,
            "vision tile size": _side(vision.image_size),
            "vision patch size": _side(vision.patch_size),
            "pixel shuffle downsample ratio": config.downsample_ratio,
            "vision feature select strategy": config.vision_feature_select_strategy,
        }
        if image_processor is not None:
            settings["image processor tiles (size, crop to tiles, min and max tiles)"] = (
                image_processor.size, image_processor.crop_to_patches, image_processor.min_patches,
                image_processor.max_patches)
        return settings


register(InternVL())
