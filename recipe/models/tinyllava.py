"""TinyLLaVA Factory's checkpoint format (github TinyLLaVA/TinyLLaVA_Factory) and its Llava equivalent.

A TinyLLaVA checkpoint is a directory with config.json (`model_type: "tinyllava"`), the weights of
`TinyLlavaForConditionalGeneration` and the tokenizer. Its forward, in Llava's terms:
- E: the vision tower's hidden states at `vision_feature_layer` (-2); `vision_feature_select_strategy`
  "patch" drops the first position whatever the tower (SigLIP has no class token: so400m-patch14-384
  gives 27 x 27 - 1 = 728 image tokens), "cls_patch" keeps all. Llava's "default" and "full" do the same.
- P: the connector; "mlp2x_gelu" is Linear-GELU-Linear with biases, exactly LlavaMultiModalProjector.
- L: the language model, fed the text embeddings with the image features spliced in at the
  IMAGE_TOKEN_INDEX (-200) placeholder, which is not a vocabulary id. Llava instead expands an
  `<image>` vocabulary token to one position per image token and scatters the features there: the same
  sequence of embeddings.
- Images: `image_aspect_ratio` "square" hands the image to the tower's processor as is; "pad" first pads it
  to a square of the processor's mean colour (int(255 * mean) per channel), the image centred.
- Text: a conversation template chosen at training time (`conv_version`, not recorded in the checkpoint);
  TEMPLATE_END_TOKENS lists those the converter renders.
"""
from __future__ import annotations

import re

MODEL_TYPE = "tinyllava"
ARCHITECTURE = "TinyLlavaForConditionalGeneration"
IMAGE_TOKEN_INDEX = -200
IGNORE_INDEX = -100
IMAGE_TAG = "<image>"

# State-dict prefixes, TinyLLaVA -> LlavaForConditionalGeneration module names. TinyLLaVA saved its towers
# with transformers 4.x, whose SiglipVisionModel/CLIPVisionModel nest everything under `vision_model.`.
# Without a tied head, TinyLLaVA also saves `language_model.lm_head.`.
KEY_PREFIXES = (
    ("language_model.lm_head.", "lm_head."),
    ("language_model.model.", "model.language_model."),
    ("connector._connector.0.", "model.multi_modal_projector.linear_1."),
    ("connector._connector.2.", "model.multi_modal_projector.linear_2."),
    ("vision_tower._vision_tower.vision_model.", "model.vision_tower."),
)

SELECT_STRATEGIES = {"patch": "default", "cls_patch": "full"}  # TinyLLaVA -> Llava
ASPECT_RATIOS = ("square", "pad")
# Vision towers Llava runs: config model_type -> the processor class TinyLLaVA pairs with it.
VISION_TOWERS = {"siglip_vision_model": "SiglipImageProcessor", "clip_vision_model": "CLIPImageProcessor"}
CONNECTOR = "mlp2x_gelu"  # the only connector LlavaMultiModalProjector (Linear-act-Linear, biases) expresses
PROJECTOR_ACTIVATION = "gelu"  # TinyLLaVA's nn.GELU(): the exact (erf) GELU, transformers' "gelu"

SYSTEM_PROMPT = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the user's questions.")
# conv_version -> the token that ends each answer. Both render
#   SYSTEM_PROMPT + " " + ("USER: " + question + " " + "ASSISTANT: " + answer + END) per round,
# a question holding <image> as "<image>\n" + the question without it, stripped.
TEMPLATE_END_TOKENS = {"qwen2_base": "<|endoftext|>", "qwen2_instruct": "<|im_end|>"}


class FormatError(ValueError):
    """A checkpoint that cannot be converted; the message is one line naming the reason."""


def to_llava_key(key: str) -> str | None:
    """The Llava module name of a TinyLLaVA state-dict key; None when the key is not part of the format."""
    for tinyllava_prefix, llava_prefix in KEY_PREFIXES:
        if key.startswith(tinyllava_prefix):
            return llava_prefix + key[len(tinyllava_prefix):]
    return None


def to_tinyllava_key(key: str) -> str | None:
    for tinyllava_prefix, llava_prefix in KEY_PREFIXES:
        if key.startswith(llava_prefix):
            return tinyllava_prefix + key[len(llava_prefix):]
    return None


def connector_problem(connector_type) -> str | None:
    """Why a TinyLLaVA connector has no Llava equivalent, or None for the one that has."""
    if connector_type == CONNECTOR:
        return None
    depth = re.fullmatch(r"mlp(\d+)x_gelu", str(connector_type))
    what = ("one Linear layer" if connector_type == "linear"
            else f"{depth.group(1)} Linear layers with GELU between them" if depth
            else "not a Linear-GELU-Linear stack")
    return (f"connector_type {connector_type!r} ({what}) cannot be converted: transformers' "
            f"LlavaMultiModalProjector is exactly Linear-GELU-Linear with biases (TinyLLaVA's {CONNECTOR!r})")


def llava_connector(projector_hidden_act, projector_bias) -> str:
    """The TinyLLaVA connector_type of a Llava projector."""
    if projector_hidden_act != PROJECTOR_ACTIVATION or not projector_bias:
        raise FormatError(f"projector (activation {projector_hidden_act!r}, bias {projector_bias}) has no TinyLLaVA "
                          f"connector: {CONNECTOR!r} is Linear-GELU-Linear with biases")
    return CONNECTOR


def chat_template(name: str) -> str:
    """A Jinja chat template that renders conversations exactly as TinyLLaVA's `name` template.

    Turns are split so that renderings are prefix-consistent and each piece tokenizes as in the whole
    text: the space before "ASSISTANT" belongs to the assistant header, the space after its ":" to the
    answer (TinyLLaVA supervises that token too). A system message replaces SYSTEM_PROMPT. Content may be
    a string with "<image>" or a list of {"type": "image"} / {"type": "text", "text": ...} parts.
    """
    if name not in TEMPLATE_END_TOKENS:
        raise FormatError(f"unknown template {name!r}; choose one of {sorted(TEMPLATE_END_TOKENS)}")
    return (
        "{%- set ns = namespace(system='" + SYSTEM_PROMPT.replace("'", "\\'") + "', started=false) -%}"
        "{%- for message in messages -%}"
        "{%- if message['content'] is string -%}"
        "{%- set text = message['content'] -%}{%- set has_image = '<image>' in text -%}"
        "{%- else -%}"
        "{%- set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text')"
        " | join('\\n') -%}"
        "{%- set has_image = message['content'] | selectattr('type', 'equalto', 'image') | list | length > 0 -%}"
        "{%- endif -%}"
        "{%- if message['role'] == 'system' -%}{%- set ns.system = text -%}"
        "{%- elif message['role'] == 'user' -%}"
        "{%- if not ns.started -%}{{ ns.system + ' ' }}{%- set ns.started = true -%}{%- endif -%}"
        "{%- if has_image -%}{%- set text = ('<image>\\n' + (text | replace('<image>', '') | trim)) | trim -%}"
        "{%- endif -%}"
        "{{ 'USER: ' + text }}"
        "{%- elif message['role'] == 'assistant' -%}{{ ' ASSISTANT: ' + text + '" + TEMPLATE_END_TOKENS[name] + "' }}"
        "{%- else -%}{{ raise_exception('TinyLLaVA templates have system, user and assistant turns, not '"
        " + message['role']) }}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ ' ASSISTANT:' }}{%- endif -%}"
    )
