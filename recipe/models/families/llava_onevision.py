"""LLaVA-OneVision (LlavaOnevisionForConditionalGeneration).

E = the SigLIP vision tower at `vision_feature_layer` (as LLaVA's), P = the multimodal projector; after P the
model's own pack_image_features lays out the anyres tiles of one image (a base tile, then the grid of tiles
picked from `image_grid_pinpoints`, unpadded to the image's aspect ratio, downscaled past
`vision_aspect_ratio`'s tile budget) with the `image_newline` embedding closing every row. The switch pass
packs with the teacher's image_newline. Every image token is an `<image>` copy; their number depends on the
image size (the processor's count, mirrored in image_text).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformers import LlavaOnevisionConfig
from transformers.image_processing_utils import select_best_resolution
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil
from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

from recipe.models.families import Family, TinyPreset, VisionOutput, parameters_of, register
from recipe.models.families.llava import image_token_count, selected_features, vision_feature_width

# LLaVA-OneVision's chat format (Qwen2 ChatML); an image is <image>.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image>' }}{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64]]


def tiles_per_image(config, image_sizes: torch.Tensor) -> list[int]:
    """The base tile plus the anyres grid, per image (what the image processor made, before batch padding)."""
    size = config.vision_config.image_size
    return [image_size_to_num_patches(image_size=s, grid_pinpoints=config.image_grid_pinpoints, patch_size=size)
            for s in image_sizes.tolist()]


def image_token_total(config, height: int, width: int) -> int:
    """Image tokens of one (height x width) image: LlavaOnevisionProcessor's count (base tile, unpadded grid
    with a newline per row, downscaled past the vision_aspect_ratio budget)."""
    side = config.vision_config.image_size
    per_side = side // config.vision_config.patch_size
    best_height, best_width = select_best_resolution([height, width], config.image_grid_pinpoints)
    rows, cols = per_side * (best_height // side), per_side * (best_width // side)
    if width / height > cols / rows:
        rows -= 2 * ((rows - int(round(height * (cols / width), 7))) // 2)
    else:
        cols -= 2 * ((cols - int(round(width * (rows / height), 7))) // 2)
    unpadded, newlines = rows * cols, rows
    budget = int(config.vision_aspect_ratio.strip("anyres_max_"))
    ratio = math.sqrt(rows * cols / (budget * per_side ** 2))
    if ratio > 1.1:
        unpadded, newlines = int(rows // ratio) * int(cols // ratio), int(rows // ratio)
    return unpadded + newlines + image_token_count(config)


class LlavaOnevision(Family):
    name = "LLaVA-OneVision"
    model_types = ("llava_onevision",)
    image_keys = ("pixel_values", "image_sizes")
    special_tokens = ("<image>", "<video>")

    def parts(self, vlm):
        return {"vision": parameters_of(vlm.model.vision_tower),
                "projector": [*parameters_of(vlm.model.multi_modal_projector), vlm.model.image_newline],
                "language": parameters_of(vlm.model.language_model, vlm.lm_head)}

    def encode_images(self, vlm, images):
        tiles = tiles_per_image(vlm.config, images["image_sizes"])
        pixels = torch.cat([image[:n] for image, n in zip(images["pixel_values"], tiles)])
        features = selected_features(vlm, pixels)
        return VisionOutput(features=features, embeds=self.project(vlm, features, images))

    def project(self, vlm, features, images):
        projected = vlm.model.multi_modal_projector(features)
        per_image = torch.split(projected, tiles_per_image(vlm.config, images["image_sizes"]))
        newline = vlm.model.image_newline
        if newline.numel() == 0:  # a ZeRO-3 partition: only a module's forward would gather it
            raise ValueError(f"ZeRO-3 partitioned LLaVA-OneVision's image_newline ({newline.ds_numel} values), which "
                             "the packing reads outside a module's forward: keep zero_optimization."
                             "stage3_param_persistence_threshold at or above the text hidden size (the default 1e5 "
                             "does)")
        packed, _ = vlm.model.pack_image_features(per_image, images["image_sizes"], image_newline=newline,
                                                  vision_aspect_ratio=vlm.config.vision_aspect_ratio)
        return torch.cat(packed)

    def stand_in_images(self, vlm):
        size = vlm.config.vision_config.image_size
        image_sizes = torch.tensor([[size, size]], device=vlm.device)
        tiles = tiles_per_image(vlm.config, image_sizes)[0]
        return {"pixel_values": torch.zeros((1, tiles, 3, size, size), device=vlm.device), "image_sizes": image_sizes}

    def image_text(self, config, processed, image_token):
        height, width = processed["image_sizes"][0].tolist()
        return image_token * image_token_total(config, height, width)

    def collate_images(self, parts):
        """Images along dim 0; each image's tiles padded to the batch's largest count (the model reads each
        image's own count from image_sizes)."""
        most = max(p["pixel_values"].shape[1] for p in parts)
        pixels = [F.pad(p["pixel_values"], (0, 0, 0, 0, 0, 0, 0, most - p["pixel_values"].shape[1])) for p in parts]
        return {"pixel_values": torch.cat(pixels), "image_sizes": torch.cat([p["image_sizes"] for p in parts])}

    def tiny(self, model_type, text, vision_layers, tokenizer):
        vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                      num_hidden_layers=vision_layers, num_attention_heads=4, image_size=32, patch_size=8)
        config = LlavaOnevisionConfig(text_config=dict(text, model_type="qwen2"), vision_config=vision,
                                      image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                                      video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
                                      image_grid_pinpoints=PINPOINTS, vision_feature_layer=-1,
                                      vision_feature_select_strategy="full")
        # A 32x32 base tile plus an anyres grid of up to 2x2 tiles.
        image_processor = LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32},
                                                          image_grid_pinpoints=PINPOINTS)
        return TinyPreset(config=config, image_processor=image_processor, processor_class="LlavaOnevisionProcessor",
                          processor_kwargs={"num_image_tokens": image_token_count(config),
                                            "vision_feature_select_strategy": "full",
                                            "vision_aspect_ratio": config.vision_aspect_ratio},
                          chat_template=CHAT_TEMPLATE, end_of_turn="<|im_end|>",
                          video_processor={"video_processor_type": "LlavaOnevisionVideoProcessor",
                                           "size": {"height": 32, "width": 32}})

    def vision_settings(self, config, image_processor=None):
        vision = config.vision_config
        settings = {
            "vision feature width (student E_S output -> teacher projector input)": vision_feature_width(config),
            "image tokens per tile": image_token_count(config),
            "vision tile size": vision.image_size,
            "anyres grid pinpoints": config.image_grid_pinpoints,
            "vision aspect ratio": config.vision_aspect_ratio,
        }
        if image_processor is not None:
            settings["image processor tiles (size, grid pinpoints)"] = (image_processor.size,
                                                                        image_processor.image_grid_pinpoints)
        return settings


register(LlavaOnevision())
