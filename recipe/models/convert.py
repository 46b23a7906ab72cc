"""TinyLLaVA Factory checkpoints in and out of the transformers Llava layout the recipe trains.

    python -m recipe.models.convert tinyllava-to-hf SRC_DIR DST_DIR [--template NAME] [--tokenizer DIR]
                                                                 [--image-processor DIR]
    python -m recipe.models.convert hf-to-tinyllava SRC_DIR DST_DIR [--llm NAME --vision-tower NAME]

tinyllava-to-hf writes a LlavaForConditionalGeneration directory whose forward is TinyLLaVA's (see
recipe/models/tinyllava.py): the same weights under Llava's names, an `<image>` token added to the tokenizer
(in a free row of the embedding table when there is one, else in a new row, the mean of the others), the
image processor TinyLLaVA uses (padding to a square for image_aspect_ratio "pad"), and a chat template that
renders conversations as TinyLLaVA's template does. It records what the way back needs in config.json
(`tinyllava_source`), which training keeps in the exported student.

hf-to-tinyllava writes the TinyLLaVA checkpoint TinyLLaVA Factory's loader reads: config.json, the weights
under TinyLLaVA's names, the tokenizer without `<image>`, the tower's preprocessor config. TinyLLaVA Factory
loads the language model's config, the tokenizer and the image processor from the names in config.json
(`llm_model_name_or_path`, `tokenizer_name_or_path`, `vision_model_name_or_path`): those of the converted
checkpoint, or --llm and --vision-tower for a Llava model that never was a TinyLLaVA one.

Everything is checked before anything is written, the output is assembled in a temporary directory next to
DST_DIR and renamed into place at the end: a failed conversion leaves nothing behind. DST_DIR must not exist
(or be empty). In -> out -> in gives identical tensors and config values.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile

import torch
import transformers
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken
from tqdm import tqdm
from transformers import AutoTokenizer, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

from recipe.models import tinyllava as F
from recipe.models.families.llava import image_token_count
from recipe.models.loading import load_image_processor, load_tokenizer

SOURCE_KEY = "tinyllava_source"  # LlavaConfig attribute: what hf-to-tinyllava restores
MAX_SHARD_BYTES = 5 * 1024**3  # TinyLLaVA Factory's (transformers 4.x Trainer's) shard size
WEIGHT_LAYOUTS = (("model.safetensors.index.json", "model.safetensors"),
                  ("pytorch_model.bin.index.json", "pytorch_model.bin"))
# Config keys that describe how a config was saved, not the model.
BOOKKEEPING = {"dtype", "torch_dtype", "architectures", "_name_or_path", "transformers_version", "model_name_or_path",
               "model_name_or_path2", "id2label", "label2id", "return_dict", "output_hidden_states",
               "output_attentions", "chunk_size_feed_forward", "is_encoder_decoder", "problem_type"}


# ---------------------------------------------------------------------------------------------- files


def read_config(src: str, model_type: str, kind: str) -> dict:
    path = os.path.join(src, "config.json")
    if not os.path.isfile(path):
        raise F.FormatError(f"{src} is not a {kind} checkpoint: no config.json")
    with open(path) as f:
        config = json.load(f)
    if config.get("model_type") != model_type:
        raise F.FormatError(f"{src} is not a {kind} checkpoint: config.json has model_type "
                            f"{config.get('model_type')!r}, expected {model_type!r}")
    return config


def weight_files(src: str) -> list[str]:
    """The checkpoint's weight files, every shard of an index present."""
    for index_name, single in WEIGHT_LAYOUTS:
        index = os.path.join(src, index_name)
        if os.path.isfile(index):
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            missing = [s for s in shards if not os.path.isfile(os.path.join(src, s))]
            if missing:
                raise F.FormatError(f"missing shard {os.path.join(src, missing[0])} ({len(missing)} of {len(shards)} "
                                    f"listed in {index_name} are absent)")
            return [os.path.join(src, s) for s in shards]
        if os.path.isfile(os.path.join(src, single)):
            return [os.path.join(src, single)]
    raise F.FormatError(f"no weights in {src} (model.safetensors, pytorch_model.bin or a sharded index of either)")


def read_weights(files: list[str]) -> dict[str, torch.Tensor]:
    state = {}
    for file in tqdm(files, desc="read weights", disable=len(files) == 1):
        state.update(load_file(file) if file.endswith(".safetensors")
                     else torch.load(file, map_location="cpu", weights_only=True))
    return state


def write_weights(state: dict[str, torch.Tensor], out: str) -> None:
    """safetensors, in shards of at most MAX_SHARD_BYTES with an index when there is more than one."""
    shards, current, size = [], {}, 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > MAX_SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
        current[key] = tensor.contiguous()
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(tqdm(shards, desc="write weights"), start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(out, name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    write_json(os.path.join(out, "model.safetensors.index.json"),
               {"metadata": {"total_size": total}, "weight_map": weight_map})


def write_json(path: str, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


@contextlib.contextmanager
def staged(dst: str):
    """A scratch directory next to dst that becomes dst when the block completes, and vanishes if it fails."""
    dst = os.path.abspath(dst)
    if os.path.exists(dst) and (not os.path.isdir(dst) or os.listdir(dst)):
        raise F.FormatError(f"{dst} already exists and is not empty; give a new directory (nothing is overwritten)")
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.partial-", dir=os.path.dirname(dst))
    try:
        yield scratch
        if os.path.isdir(dst):
            os.rmdir(dst)
        os.rename(scratch, dst)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise


def tokenizer_from(directory: str):
    try:
        return load_tokenizer(directory)
    except FileNotFoundError as error:
        raise F.FormatError(str(error)) from None


def tinyllava_tokenizer_from(directory: str, hint: str):
    """The tokenizer of a TinyLLaVA directory, its class from its own files: transformers does not know the
    config.json beside it (`model_type: "tinyllava"`)."""
    try:
        return AutoTokenizer.from_pretrained(directory, config=transformers.PretrainedConfig())
    except (OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise F.FormatError(f"no usable tokenizer in {directory!r}: {reason}{hint}") from None


# ---------------------------------------------------------------------------------------------- configs


def plain(d: dict | None) -> dict:
    """A sub-config dict as keyword arguments of its config class."""
    return {k: v for k, v in (d or {}).items() if k not in ("model_type", "model_name_or_path", "model_name_or_path2")}


def llava_config(source: dict) -> LlavaConfig:
    """The LlavaConfig of a TinyLLaVA config.json (without the image token, which the tokenizer decides)."""
    problem = F.connector_problem(source.get("connector_type"))
    if problem:
        raise F.FormatError(problem)
    if source.get("vision_model_name_or_path2"):
        raise F.FormatError(f"two vision towers ({source.get('vision_model_name_or_path')!r} and "
                            f"{source['vision_model_name_or_path2']!r}) cannot be converted: Llava runs one")
    vision = source.get("vision_config") or {}
    if vision.get("model_type") not in F.VISION_TOWERS:
        raise F.FormatError(f"vision tower {vision.get('model_type')!r} ({source.get('vision_model_name_or_path')!r}) "
                            f"cannot be converted: the converter runs {sorted(F.VISION_TOWERS)} in Llava")
    strategy = source.get("vision_feature_select_strategy", "patch")
    if strategy not in F.SELECT_STRATEGIES:
        raise F.FormatError(f"vision_feature_select_strategy {strategy!r} cannot be converted; "
                            f"known: {sorted(F.SELECT_STRATEGIES)}")
    layer = source.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise F.FormatError(f"vision_feature_layer {layer!r} cannot be converted: TinyLLaVA takes one layer")
    aspect = source.get("image_aspect_ratio", "square")
    if aspect not in F.ASPECT_RATIOS:
        raise F.FormatError(f"image_aspect_ratio {aspect!r} cannot be converted; known: {list(F.ASPECT_RATIOS)}")
    text = source.get("text_config") or {}
    text_type = text.get("model_type")
    if text_type not in CONFIG_MAPPING or text_type not in MODEL_MAPPING_NAMES:
        raise F.FormatError(f"language model {text_type!r} ({source.get('llm_model_name_or_path')!r}) cannot be "
                            f"converted: transformers {transformers.__version__} has no model for it")
    vision_config = CONFIG_MAPPING[vision["model_type"]].from_dict(plain(vision))
    config = LlavaConfig(vision_config=vision_config, text_config=CONFIG_MAPPING[text_type].from_dict(plain(text)),
                         vision_feature_layer=layer, vision_feature_select_strategy=F.SELECT_STRATEGIES[strategy],
                         projector_hidden_act=F.PROJECTOR_ACTIVATION, multimodal_projector_bias=True)
    config.image_seq_length = image_token_count(config)
    return config


def legacy_dict(config) -> dict:
    """A sub-config as TinyLLaVA Factory's transformers 4.x reads it: every value explicit, RoPE as rope_theta
    (and rope_scaling), the dtype as torch_dtype."""
    d = {k: v for k, v in config.to_dict().items() if k not in BOOKKEEPING}
    rope = d.pop("rope_parameters", None)
    if rope:
        d["rope_theta"] = rope.get("rope_theta")
        if rope.get("rope_type", "default") != "default":
            d["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    if config.dtype is not None:
        d["torch_dtype"] = str(config.dtype).removeprefix("torch.")
    return d


def sub_config(original: dict | None, live, label: str, **fixed) -> dict:
    """The TinyLLaVA dict of a sub-config: the original one while it still describes the live model (the same
    values once both are read by transformers), else the live one."""
    now = {k: v for k, v in live.to_dict().items() if k not in BOOKKEEPING} | fixed
    if original:
        resolved = CONFIG_MAPPING[original["model_type"]].from_dict(plain(original)).to_dict()
        differing = sorted(k for k in resolved.keys() | now.keys()
                           if k not in BOOKKEEPING and resolved.get(k) != now.get(k))
        if not differing:
            return original
        print(f"[convert] {label} differs from the TinyLLaVA original in {', '.join(differing)}: written anew")
    return legacy_dict(live) | fixed


# ---------------------------------------------------------------------------------------------- tinyllava -> hf


def resolve_template(template: str | None, text_config) -> str:
    if template is not None:
        F.chat_template(template)  # validates the name
        return template
    if text_config.model_type == "qwen2":
        print("[convert] chat template qwen2_base (TinyLLaVA's conv_version for its Qwen2 and Qwen2.5 models; "
              "--template for another)")
        return "qwen2_base"
    raise F.FormatError(f"pass --template (one of {sorted(F.TEMPLATE_END_TOKENS)}): the checkpoint does not record "
                        f"the conv_version it was trained with, and {text_config.model_type!r} has no default")


def add_image_token(tokenizer, rows: int) -> tuple[int, bool]:
    """Id of `<image>` (added as a special token when absent) and whether the embedding table needs a row for it."""
    if len(tokenizer) > rows:
        raise F.FormatError(f"the tokenizer has {len(tokenizer)} tokens but the embedding table {rows} rows")
    if F.IMAGE_TAG not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(F.IMAGE_TAG, special=True, normalized=False)], special_tokens=True)
    token_id = tokenizer.convert_tokens_to_ids(F.IMAGE_TAG)
    return token_id, token_id >= rows


def llava_weights(state: dict[str, torch.Tensor], config: LlavaConfig, grow: bool) -> dict[str, torch.Tensor]:
    """TinyLLaVA's state dict under Llava's module names, the tied head left to tie_weights, the tables one row
    longer when grow."""
    renamed = {F.to_llava_key(key): tensor for key, tensor in state.items()}
    outside = [key for key in state if F.to_llava_key(key) is None]
    if outside:
        raise F.FormatError(f"{len(outside)} weights are outside TinyLLaVA's language_model, vision_tower and "
                            f"connector (e.g. {outside[0]!r})")
    embed = "model.language_model.embed_tokens.weight"
    tied = config.text_config.tie_word_embeddings
    if tied and "lm_head.weight" in renamed:
        if not torch.equal(renamed.pop("lm_head.weight"), renamed.get(embed)):
            raise F.FormatError("text_config.tie_word_embeddings is set but language_model.lm_head.weight differs "
                                "from the input embeddings")
    if grow:
        for name in [embed] + ([] if tied else ["lm_head.weight"]):
            table = renamed.get(name)
            if table is not None:
                renamed[name] = torch.cat([table, table.mean(0, keepdim=True)])
    return renamed


def build_llava(config: LlavaConfig, weights: dict[str, torch.Tensor]) -> LlavaForConditionalGeneration:
    """The Llava model holding exactly these tensors, after checking that they are all it needs."""
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    expected = model.state_dict()
    tied = config.text_config.tie_word_embeddings
    missing = [k for k in expected if k not in weights and not (tied and k == "lm_head.weight")]
    unexpected = [k for k in weights if k not in expected]
    wrong = [f"{k} {tuple(weights[k].shape)} vs {tuple(expected[k].shape)}"
             for k in weights.keys() & expected.keys() if weights[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        parts = [f"{len(v)} {what} (e.g. {v[0]})" for what, v in
                 (("missing", missing), ("unexpected", unexpected), ("of another shape", wrong)) if v]
        raise F.FormatError("the weights do not fit the model config.json describes: " + "; ".join(parts))
    model.load_state_dict(weights, strict=False, assign=True)
    model.tie_weights()
    model.config.dtype = weights["model.language_model.embed_tokens.weight"].dtype
    return model


def tower_processor(vision_config, directory: str | None):
    """The image processor TinyLLaVA pairs with the tower (it loads it from vision_model_name_or_path): from
    `directory` when given, else the tower's processor at the tower's image size."""
    size = vision_config.image_size
    if directory is not None:
        try:
            processor = load_image_processor(directory)
        except FileNotFoundError as error:
            raise F.FormatError(str(error)) from None
    else:
        cls = getattr(transformers, F.VISION_TOWERS[vision_config.model_type] + "Pil")
        square = {"height": size, "width": size}
        processor = cls(size=square) if vision_config.model_type == "siglip_vision_model" else \
            cls(size={"shortest_edge": size}, crop_size=square)
    from PIL import Image
    shape = tuple(processor(images=[Image.new("RGB", (size + 7, size))], return_tensors="pt")["pixel_values"].shape)
    if shape[1:] != (3, size, size):
        raise F.FormatError(f"the image processor makes {shape[1:]} pixel values, the vision tower takes (3, {size}, "
                            f"{size})")
    return processor


def llava_image_processor(tower, aspect: str):
    """The tower's processor for "square"; for "pad", Llava's image processor with the same settings, which pads
    to a square of the mean colour first exactly as TinyLLaVA's expand2square does."""
    if aspect == "square":
        return tower
    settings = {k: v for k, v in tower.to_dict().items() if k not in ("image_processor_type", "processor_class")}
    settings["do_center_crop"] = settings.get("do_center_crop", False)
    return transformers.LlavaImageProcessorPil(**settings, do_pad=True)


def tinyllava_to_hf(src: str, dst: str, *, template: str | None = None, tokenizer_dir: str | None = None,
                    image_processor_dir: str | None = None) -> str:
    source = read_config(src, F.MODEL_TYPE, "TinyLLaVA")
    config = llava_config(source)
    files = weight_files(src)
    template = resolve_template(template, config.text_config)
    end_token = F.TEMPLATE_END_TOKENS[template]
    tokenizer = tinyllava_tokenizer_from(tokenizer_dir or src, "" if tokenizer_dir else f"; pass --tokenizer DIR "
                                         f"(config.json names {source.get('tokenizer_name_or_path')!r})")
    if end_token not in tokenizer.get_vocab():
        raise F.FormatError(f"template {template!r} ends answers with {end_token!r}, which the tokenizer does not have")
    original_template = tokenizer.chat_template
    rows = config.text_config.vocab_size
    config.image_token_id, grow = add_image_token(tokenizer, rows)
    if grow:
        config.text_config.vocab_size += 1
    tokenizer.chat_template = F.chat_template(template)
    tower = tower_processor(config.vision_config, image_processor_dir or
                            (src if os.path.isfile(os.path.join(src, "preprocessor_config.json")) else None))
    setattr(config, SOURCE_KEY, {
        "config": source, "template": template, "added_embedding_row": grow,
        "tokenizer_chat_template": original_template, "tokenizer_class": tokenizer_class(src),
        "image_processor": json.loads(tower.to_json_string()), "generation_config": generation_config(src)})
    model = build_llava(config, llava_weights(read_weights(files), config, grow))
    model.generation_config = transformers.GenerationConfig(
        eos_token_id=tokenizer.convert_tokens_to_ids(end_token), pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id)
    processor = LlavaProcessor(
        image_processor=llava_image_processor(tower, source.get("image_aspect_ratio", "square")),
        tokenizer=tokenizer, patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy, image_token=F.IMAGE_TAG,
        num_additional_image_tokens=int(config.vision_config.model_type == "clip_vision_model"),  # CLIP's class token
        chat_template=tokenizer.chat_template)
    with staged(dst) as out:
        model.save_pretrained(out)
        processor.save_pretrained(out)
        tokenizer.save_pretrained(out)
    row = "a new row" if grow else f"a free row of the {rows}-row table"
    print(f"[convert] {src} -> {dst}: Llava with {config.image_seq_length} image tokens "
          f"({config.vision_config.model_type}, layer {config.vision_feature_layer}, "
          f"{config.vision_feature_select_strategy}), connector {source['connector_type']}, "
          f"{'tied' if config.text_config.tie_word_embeddings else 'untied'} {config.text_config.model_type} head; "
          f"<image> = id {config.image_token_id} ({row}); template {template}; "
          f"image_aspect_ratio {source.get('image_aspect_ratio', 'square')}")
    return dst


def tokenizer_class(directory: str) -> str | None:
    path = os.path.join(directory, "tokenizer_config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f).get("tokenizer_class")


def generation_config(directory: str) -> dict | None:
    path = os.path.join(directory, "generation_config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------- hf -> tinyllava


def tinyllava_weights(model, source: dict) -> dict[str, torch.Tensor]:
    config = model.config
    tied = config.text_config.tie_word_embeddings
    state = {}
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        key = F.to_tinyllava_key(name)
        if key is None:
            raise F.FormatError(f"weight {name!r} has no place in TinyLLaVA's layout")
        state[key] = tensor
    if source.get("added_embedding_row"):  # the row <image> was given on the way in
        for key in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
            if key in state:
                state[key] = state[key][:-1].clone()
    return state


def tinyllava_tokenizer(tokenizer, source: dict, out: str) -> None:
    """The tokenizer as TinyLLaVA had it: without the `<image>` the way in appended, with its own chat template."""
    if not source:
        tokenizer.save_pretrained(out)
        return
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer.save_pretrained(scratch)
        drop_last_added_token(scratch, F.IMAGE_TAG)
        restored = AutoTokenizer.from_pretrained(scratch)
    if len(restored) != len(tokenizer) - 1 or F.IMAGE_TAG in restored.get_vocab():
        raise F.FormatError(f"could not remove {F.IMAGE_TAG} from the tokenizer")
    restored.chat_template = source.get("tokenizer_chat_template")
    restored.save_pretrained(out)
    if source.get("tokenizer_class"):
        path = os.path.join(out, "tokenizer_config.json")
        with open(path) as f:
            settings = json.load(f)
        write_json(path, settings | {"tokenizer_class": source["tokenizer_class"]})


def drop_last_added_token(directory: str, token: str) -> None:
    """Remove `token`, the tokenizer's highest id, from a saved tokenizer's files."""
    path = os.path.join(directory, "tokenizer.json")
    with open(path) as f:
        backend = json.load(f)
    added = backend["added_tokens"]
    if not added or added[-1]["content"] != token or added[-1]["id"] != max(a["id"] for a in added):
        raise F.FormatError(f"{token} is not the tokenizer's last added token; it cannot be removed")
    backend["added_tokens"] = added[:-1]
    write_json(path, backend)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            settings = json.load(f)
        for key in ("extra_special_tokens", "additional_special_tokens"):
            if isinstance(settings.get(key), list):
                settings[key] = [t for t in settings[key] if (t.get("content") if isinstance(t, dict) else t) != token]
        if isinstance(settings.get("added_tokens_decoder"), dict):
            settings["added_tokens_decoder"] = {i: t for i, t in settings["added_tokens_decoder"].items()
                                                if t.get("content") != token}
        write_json(path, settings)


def tower_processor_dict(processor, tower_type: str) -> dict:
    """The tower's own preprocessor config (what TinyLLaVA loads from vision_model_name_or_path)."""
    settings = json.loads(processor.to_json_string())
    if not settings.pop("do_pad", False):
        return settings
    if not settings.get("do_center_crop"):
        settings.pop("do_center_crop", None)
        settings.pop("crop_size", None)
    return settings | {"image_processor_type": F.VISION_TOWERS[tower_type]}


def tinyllava_config(config: LlavaConfig, source: dict, tokenizer, aspect: str, llm: str | None,
                     vision_tower: str | None, dtype: torch.dtype) -> dict:
    text, vision = config.text_config, config.vision_config
    rows = text.vocab_size - int(bool(source.get("added_embedding_row")))
    original = source.get("config") or {}
    out = dict(original) or {
        "architectures": [F.ARCHITECTURE], "model_type": F.MODEL_TYPE, "vision_model_name_or_path2": "",
        "ignore_index": F.IGNORE_INDEX, "image_token_index": F.IMAGE_TOKEN_INDEX, "tokenizer_padding_side": "right",
        "tokenizer_model_max_length": min(tokenizer.model_max_length, 2048), "tokenizer_use_fast": False,
        "use_cache": True}
    if llm:
        out |= {"llm_model_name_or_path": llm, "tokenizer_name_or_path": llm}
    if vision_tower:
        out["vision_model_name_or_path"] = vision_tower
    derived = {
        "connector_type": F.llava_connector(config.projector_hidden_act, config.multimodal_projector_bias),
        "hidden_size": text.hidden_size, "vocab_size": rows, "vision_hidden_size": vision.hidden_size,
        "vision_feature_layer": config.vision_feature_layer,
        "vision_feature_select_strategy": {v: k for k, v in F.SELECT_STRATEGIES.items()}[
            config.vision_feature_select_strategy],
        "image_aspect_ratio": aspect, "pad_token": tokenizer.pad_token, "pad_token_id": tokenizer.pad_token_id,
        "torch_dtype": str(dtype).removeprefix("torch.")}
    out |= {k: v for k, v in derived.items() if out.get(k) != v}
    out["text_config"] = sub_config(original.get("text_config"), text, "text_config", vocab_size=rows)
    tower_names = {"model_name_or_path": out["vision_model_name_or_path"],
                   "model_name_or_path2": out["vision_model_name_or_path2"]}
    vision_dict = sub_config(original.get("vision_config"), vision, "vision_config")
    out["vision_config"] = vision_dict | {k: v for k, v in tower_names.items() if vision_dict.get(k) != v}
    return out


def hf_to_tinyllava(src: str, dst: str, *, llm: str | None = None, vision_tower: str | None = None) -> str:
    read_config(src, "llava", "Llava")
    weight_files(src)  # every shard present before anything is loaded
    config = LlavaConfig.from_pretrained(src)
    F.llava_connector(config.projector_hidden_act, config.multimodal_projector_bias)
    tower_type = config.vision_config.model_type
    if tower_type not in F.VISION_TOWERS:
        raise F.FormatError(f"vision tower {tower_type!r} has no TinyLLaVA equivalent here; known: "
                            f"{sorted(F.VISION_TOWERS)}")
    if not isinstance(config.vision_feature_layer, int):
        raise F.FormatError(f"vision_feature_layer {config.vision_feature_layer} cannot be converted: TinyLLaVA "
                            "takes one layer")
    source = getattr(config, SOURCE_KEY, None) or {}
    if not source and not (llm and vision_tower):
        raise F.FormatError(f"{src} was not converted from TinyLLaVA: give --llm and --vision-tower, the names or "
                            "paths TinyLLaVA Factory loads the language model, tokenizer and image processor from "
                            "(e.g. Qwen/Qwen2-0.5B and google/siglip-so400m-patch14-384)")
    tokenizer = tokenizer_from(src)
    try:
        processor = load_image_processor(src)
    except FileNotFoundError as error:
        raise F.FormatError(str(error)) from None
    aspect = "pad" if getattr(processor, "do_pad", False) else "square"
    model = LlavaForConditionalGeneration.from_pretrained(src, dtype="auto")
    dtype = model.model.language_model.embed_tokens.weight.dtype
    config_dict = tinyllava_config(model.config, source, tokenizer, aspect, llm, vision_tower, dtype)
    state = tinyllava_weights(model, source)
    with staged(dst) as out:
        write_weights(state, out)
        write_json(os.path.join(out, "config.json"), config_dict)
        tinyllava_tokenizer(tokenizer, source, out)
        write_json(os.path.join(out, "preprocessor_config.json"),
                   source.get("image_processor") or tower_processor_dict(processor, tower_type))
        if source.get("generation_config"):
            write_json(os.path.join(out, "generation_config.json"), source["generation_config"])
    template = f"conv_version {source['template']!r}" if source else "the conv_version the model was trained with"
    print(f"[convert] {src} -> {dst}: TinyLLaVA ({config_dict['connector_type']}, {len(state)} tensors, "
          f"{config_dict['torch_dtype']}); TinyLLaVA Factory reads it with {template}, the language model and "
          f"tokenizer from {config_dict['llm_model_name_or_path']!r} and {config_dict['tokenizer_name_or_path']!r}, "
          f"the image processor from {config_dict['vision_model_name_or_path']!r}")
    return dst


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    to_hf = commands.add_parser("tinyllava-to-hf", help="TinyLLaVA Factory checkpoint -> transformers Llava directory")
    to_hf.add_argument("src")
    to_hf.add_argument("dst")
    to_hf.add_argument("--template", choices=sorted(F.TEMPLATE_END_TOKENS),
                       help="TinyLLaVA's conv_version the model was trained with (default: qwen2_base for Qwen2)")
    to_hf.add_argument("--tokenizer", help="tokenizer directory, when SRC_DIR has none")
    to_hf.add_argument("--image-processor", help="the vision tower's directory (e.g. google/siglip-so400m-patch14-384) "
                                                 "for its preprocessor config; default: SRC_DIR's, else the tower's "
                                                 "processor at its image size")
    to_tl = commands.add_parser("hf-to-tinyllava", help="transformers Llava directory -> TinyLLaVA Factory checkpoint")
    to_tl.add_argument("src")
    to_tl.add_argument("dst")
    to_tl.add_argument("--llm", help="language model name or path for config.json (default: the converted one's)")
    to_tl.add_argument("--vision-tower",
                       help="vision tower name or path for config.json (default: the converted one's)")
    args = parser.parse_args(argv)
    try:
        if args.command == "tinyllava-to-hf":
            tinyllava_to_hf(args.src, args.dst, template=args.template, tokenizer_dir=args.tokenizer,
                            image_processor_dir=args.image_processor)
        else:
            hf_to_tinyllava(args.src, args.dst, llm=args.llm, vision_tower=args.vision_tower)
    except F.FormatError as error:
        sys.exit(f"convert: {error}")


if __name__ == "__main__":
    main()
