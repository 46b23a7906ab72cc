"""Idefics3 and SmolVLM (Idefics3ForConditionalGeneration, SmolVLMForConditionalGeneration).

E = the SigLIP-style vision transformer (`model.vision_model`, post-layernorm included), P = the connector
(`model.connector`: pixel shuffle by `scale_factor` + the modality projection). Images are split into a grid of
tiles of `max_image_size` plus a downscaled global tile; tiles smaller than the largest in the batch are padded,
and `pixel_attention_mask` marks their real pixels. The processor writes, per image,
`<fake_token_around_image><row_1_col_1><image> x image_seq_len ...` and the global tile after `<global-img>`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import Idefics3Config, SmolVLMConfig
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil
from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string

from recipe.models.families import Family, TinyPreset, VisionOutput, first_layer_weight_dtype, parameters_of, register

FAKE_TOKEN, GLOBAL_IMAGE, END_OF_UTTERANCE = "<fake_token_around_image>", "<global-img>", "<end_of_utterance>"
MAX_GRID = 4  # tile rows and columns the tiny presets' tokenizers get <row_i_col_j> tokens for
# Idefics3's chat format: "User:<image>question<end_of_utterance>\nAssistant: answer<end_of_utterance>\n" after
# the tokenizer's begin-of-text token (Idefics3: Llama 3's <|begin_of_text|>; SmolVLM: <|im_start|>).
CHAT_FORMAT = (
    "{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}{{ ': ' + message['content'] }}{% else %}"
    "{{ ':' if message['content'][0]['type'] == 'image' else ': ' }}{% for item in message['content'] %}"
    "{% if item['type'] == 'text' %}{{ item['text'] }}{% elif item['type'] == 'image' %}{{ '<image>' }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<end_of_utterance>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
BEGIN_OF_TEXT = {"idefics3": "<|begin_of_text|>", "smolvlm": "<|im_start|>"}


def image_seq_len(config) -> int:
    """Tokens per tile: the vision transformer's patches over the pixel shuffle's scale factor squared."""
    vision = config.vision_config
    return (vision.image_size // vision.patch_size) ** 2 // config.scale_factor ** 2


class Idefics3(Family):
    name = "Idefics3 / SmolVLM"
    model_types = ("idefics3", "smolvlm")
    image_keys = ("pixel_values", "pixel_attention_mask")
    special_tokens = (FAKE_TOKEN, "<image>", GLOBAL_IMAGE, END_OF_UTTERANCE, "<|begin_of_text|>",
                      *(f"<row_{r}_col_{c}>" for r in range(1, MAX_GRID + 1) for c in range(1, MAX_GRID + 1)))

    def parts(self, vlm):
        return {"vision": parameters_of(vlm.model.vision_model),
                "projector": parameters_of(vlm.model.connector),
                "language": parameters_of(vlm.model.text_model, vlm.lm_head)}

    def language_model(self, vlm):
        return vlm.model.text_model

    def encode_images(self, vlm, images):
        # The batch holds real tiles only (collate_images concatenates them), so unlike the model's own
        # get_image_features nothing is dropped as an all-zero padding image: a black stand-in tile runs too.
        pixels, mask = images["pixel_values"][0], images["pixel_attention_mask"][0].bool()
        patch = vlm.config.vision_config.patch_size
        patch_mask = mask.unfold(1, patch, patch).unfold(2, patch, patch).sum(dim=(-1, -2)) > 0
        vision = vlm.model.vision_model
        features = vision(pixel_values=pixels.to(first_layer_weight_dtype(vision)), patch_attention_mask=patch_mask,
                          return_dict=True).last_hidden_state
        return VisionOutput(features=features, embeds=self.project(vlm, features, images))

    def project(self, vlm, features, images):
        return vlm.model.connector(features).flatten(0, 1)

    def stand_in_images(self, vlm):
        size = vlm.config.vision_config.image_size
        return {"pixel_values": torch.zeros((1, 1, 3, size, size), device=vlm.device),
                "pixel_attention_mask": torch.ones((1, 1, size, size), dtype=torch.bool, device=vlm.device)}

    def process_image(self, image_processor, image):
        return dict(image_processor(images=[[image]], return_tensors="pt", return_row_col_info=True))

    def image_text(self, config, processed, image_token):
        return get_image_prompt_string(processed["rows"][0][0], processed["cols"][0][0], image_seq_len(config),
                                       fake_token_around_image=FAKE_TOKEN, image_token=image_token,
                                       global_image_token=GLOBAL_IMAGE)

    def collate_images(self, parts):
        """Tiles of all images along the model's images dimension, (1, tiles, 3, H, W), padded to the largest
        tile with a pixel mask of 0 where padded, as the image processor pads a batch."""
        height = max(p["pixel_values"].shape[-2] for p in parts)
        width = max(p["pixel_values"].shape[-1] for p in parts)

        def padded(tensor):
            return F.pad(tensor, (0, width - tensor.shape[-1], 0, height - tensor.shape[-2]))
        return {"pixel_values": torch.cat([padded(p["pixel_values"]) for p in parts], dim=1),
                "pixel_attention_mask": torch.cat([padded(p["pixel_attention_mask"]) for p in parts], dim=1)}

    def tiny(self, model_type, text, vision_layers, tokenizer):
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=vision_layers, num_attention_heads=4,
                      image_size=32, patch_size=8)
        config_class, image_processor_class = {"idefics3": (Idefics3Config, Idefics3ImageProcessorPil),
                                               "smolvlm": (SmolVLMConfig, SmolVLMImageProcessorPil)}[model_type]
        config = config_class(text_config=dict(text, model_type="llama"), vision_config=vision, scale_factor=2,
                              image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                              pad_token_id=tokenizer.pad_token_id)
        # Images resized to a longest edge of 64 and split into 32x32 tiles (up to 2x2) plus the global one.
        sizes = dict(size={"longest_edge": 64}, max_image_size={"longest_edge": 32})
        video = None if model_type == "idefics3" else {"video_processor_type": "SmolVLMVideoProcessor", **sizes}
        return TinyPreset(config=config, image_processor=image_processor_class(**sizes),
                          processor_class="Idefics3Processor" if model_type == "idefics3" else "SmolVLMProcessor",
                          processor_kwargs={"image_seq_len": image_seq_len(config)},
                          chat_template="{{ '" + BEGIN_OF_TEXT[model_type] + "' }}" + CHAT_FORMAT,
                          end_of_turn=END_OF_UTTERANCE, video_processor=video)

    def vision_settings(self, config, image_processor=None):
        vision = config.vision_config
        settings = {
            "vision feature width (student E_S output -> teacher projector input)": vision.hidden_size,
            "vision tile size": vision.image_size,
            "vision patch size": vision.patch_size,
            "pixel shuffle scale factor": config.scale_factor,
        }
        if image_processor is not None:
            settings["image processor sizes (resize, tile, splitting)"] = (
                image_processor.size, image_processor.max_image_size, image_processor.do_image_splitting)
        return settings


register(Idefics3())
