"""TinyLLaVA Factory checkpoints in and out (recipe.models.convert), and the paper pair's tokenizers.

The TinyLLaVA checkpoints here are written as TinyLLaVA Factory writes them (transformers 4.x): its
config.json fields, its state-dict names (`language_model.`, `vision_tower._vision_tower.vision_model.`,
`connector._connector.`), a slow-format Qwen2 tokenizer (vocab.json, merges.txt) with the special tokens
above the BPE vocabulary, like Qwen2's (and Qwen2.5's, which has more of them).
"""
import copy
import json
import os

import numpy as np
import pytest
import torch
from assets import run_module
from PIL import Image
from safetensors.torch import load_file, save_file
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from torch import nn
from transformers import (
    AutoConfig,
    AutoTokenizer,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    Qwen2Config,
    Qwen2ForCausalLM,
    SiglipImageProcessorPil,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from recipe.data import encode_conversation, encode_prompt
from recipe.models import IncompatiblePair, check_pair, image_token_count, load_image_processor
from recipe.models.convert import SOURCE_KEY, hf_to_tinyllava, llava_config, main, tinyllava_to_hf

QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"""
               r"""|\s+(?!\S)|\s+""")
QWEN2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN25_SPECIALS = QWEN2_SPECIALS + ["<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>"]
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'"
          " + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions.")
IMAGE_SIZE, PATCH = 32, 8
IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2 - 1  # "patch" drops the first position, SigLIP or not
STUDENT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
TEACHER = dict(hidden_size=96, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)


# ------------------------------------------------------------------------------------------ TinyLLaVA files


def tinyllava_prompt(conversations, end="<|endoftext|>"):
    """TinyLLaVA's qwen2_base / qwen2_instruct Template._prompt (tinyllava/data/template/); an answer None is
    its eval mode, which ends the prompt with "ASSISTANT:"."""
    msg = ""
    for i in range(0, len(conversations), 2):
        question, answer = conversations[i]["value"], conversations[i + 1]["value"]
        if i == 0:
            msg += SYSTEM + " "
        if "<image>" in question:
            question = ("<image>\n" + question.replace("<image>", "").strip()).strip()
        msg += "USER: " + question + " "
        msg += "ASSISTANT:" if answer is None else "ASSISTANT: " + answer + end
    return msg


def tinyllava_image_ids(prompt, tokenizer):
    """Template.tokenizer_image_token: chunks between <image> tokenized alone, -200 between them."""
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]
    ids = []
    for i, chunk in enumerate(chunks):
        ids += ([-200] if i else []) + chunk
    return ids


def tinyllava_labels(ids, prompt, tokenizer, end="<|endoftext|>"):
    """Template.make_labels / _make_masks for a tokenizer without BOS (Qwen2)."""
    labels = list(ids)
    cur = 0
    for round_text in prompt.split(end):
        if round_text == "":
            break
        parts = round_text.split(" ASSISTANT: ")
        assert len(parts) == 2
        round_len = len(tinyllava_image_ids(round_text, tokenizer)) + len(tokenizer.encode(end))
        instruction_len = len(tinyllava_image_ids(parts[0] + " ASSISTANT: ", tokenizer)) - 1
        labels[cur:cur + instruction_len] = [-100] * instruction_len
        cur += round_len
    labels[cur:] = [-100] * (len(labels) - cur)
    assert cur == len(ids), "TinyLLaVA would have found a tokenization mismatch"
    return labels


def expand_image(ids, labels, image_id):
    """TinyLLaVA's -200 as the IMAGE_TOKENS Llava positions it becomes."""
    out_ids, out_labels = [], []
    for token, label in zip(ids, labels):
        copies = IMAGE_TOKENS if token == -200 else 1
        out_ids += [image_id if token == -200 else token] * copies
        out_labels += [-100 if token == -200 else label] * copies
    return out_ids, out_labels


def write_qwen2_tokenizer(directory, texts, specials):
    """A byte-level BPE with Qwen2's pre-tokenizer, saved in the slow format TinyLLaVA Factory saves (it loads
    tokenizers with use_fast=False), its special tokens above the BPE vocabulary, pad = unk = <|endoftext|>."""
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=700, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    model = json.loads(bpe.to_str())["model"]
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "vocab.json"), "w") as f:
        json.dump(model["vocab"], f)
    with open(os.path.join(directory, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "".join(" ".join(pair) + "\n" for pair in model["merges"]))
    first = len(model["vocab"])
    added = {str(first + i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                              "single_word": False, "special": True} for i, t in enumerate(specials)}
    settings = {"add_prefix_space": False, "added_tokens_decoder": added, "additional_special_tokens": specials[1:],
                "bos_token": None, "chat_template": CHATML, "clean_up_tokenization_spaces": False,
                "eos_token": "<|endoftext|>", "errors": "replace", "model_max_length": 2048,
                "pad_token": "<|endoftext|>", "padding_side": "right", "split_special_tokens": False,
                "tokenizer_class": "Qwen2Tokenizer", "unk_token": "<|endoftext|>"}
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(settings, f, indent=2)
    return directory


def write_tinyllava(directory, tokenizer_dir, *, text, tied, vocab_size, seed=0, dtype=torch.float32,
                    connector="mlp2x_gelu", aspect="square", shards=1, tower="siglip_vision_model"):
    """A TinyLLaVA Factory checkpoint (finetune stage output): config.json, safetensors, tokenizer. Returns the
    TinyLLaVA modules it holds, for computing its forward."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    text_values = dict(text, vocab_size=vocab_size, tie_word_embeddings=tied, max_position_embeddings=1024,
                       rms_norm_eps=1e-6, rope_theta=1000000.0, bos_token_id=eot, eos_token_id=eot)
    vision_values = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                         image_size=IMAGE_SIZE, patch_size=PATCH, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh")
    torch.manual_seed(seed)
    lm = Qwen2ForCausalLM(Qwen2Config(**text_values)).to(dtype).eval()
    tower_model = SiglipVisionModel(SiglipVisionConfig(**vision_values)).to(dtype).eval()
    projector = nn.Sequential(nn.Linear(64, text["hidden_size"]), nn.GELU(),
                              nn.Linear(text["hidden_size"], text["hidden_size"])).to(dtype)
    state = {f"language_model.{k}": v for k, v in lm.state_dict().items() if not (tied and k == "lm_head.weight")}
    state |= {f"vision_tower._vision_tower.vision_model.{k}": v for k, v in tower_model.state_dict().items()}
    state |= {f"connector._connector.{k}": v for k, v in projector.state_dict().items()}
    state = {k: v.clone().contiguous() for k, v in state.items()}
    os.makedirs(directory, exist_ok=True)
    if shards == 1:
        save_file(state, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    else:
        keys, weight_map = sorted(state), {}
        for i in range(shards):
            name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = keys[i::shards]
            save_file({k: state[k] for k in part}, os.path.join(directory, name), metadata={"format": "pt"})
            weight_map |= dict.fromkeys(part, name)
        with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)
    dtype_name = str(dtype).removeprefix("torch.")
    config = {
        "architectures": ["TinyLlavaForConditionalGeneration"], "cache_dir": None, "connector_type": connector,
        "hidden_size": text["hidden_size"], "ignore_index": -100, "image_aspect_ratio": aspect,
        "image_token_index": -200, "llm_model_name_or_path": "Qwen/Qwen2-0.5B", "model_type": "tinyllava",
        "num_queries": 128, "num_resampler_layers": 3, "pad_token": "<|endoftext|>", "pad_token_id": eot,
        "resampler_hidden_size": 768, "tokenizer_model_max_length": 2048, "tokenizer_name_or_path": "Qwen/Qwen2-0.5B",
        "tokenizer_padding_side": "right", "tokenizer_use_fast": False, "torch_dtype": dtype_name,
        "transformers_version": "4.40.1", "tune_type_connector": "full", "tune_type_llm": "full",
        "tune_type_vision_tower": "frozen", "tune_vision_tower_from_layer": 0, "use_cache": True,
        "vision_feature_layer": -2, "vision_feature_select_strategy": "patch", "vision_hidden_size": 64,
        "vision_model_name_or_path": "google/siglip-so400m-patch14-384", "vision_model_name_or_path2": "",
        "vocab_size": vocab_size,
        "text_config": dict(text_values, _name_or_path="Qwen/Qwen2-0.5B", architectures=["Qwen2ForCausalLM"],
                            model_type="qwen2", attention_dropout=0.0, hidden_act="silu", initializer_range=0.02,
                            max_window_layers=text["num_hidden_layers"], sliding_window=1024, use_cache=True,
                            use_sliding_window=False, torch_dtype=dtype_name),
        "vision_config": dict(vision_values, model_type=tower, model_name_or_path="google/siglip-so400m-patch14-384",
                              model_name_or_path2=""),
    }
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):  # the tokenizer, as TinyLLaVA saves it
        with open(os.path.join(tokenizer_dir, name)) as src, open(os.path.join(directory, name), "w") as dst:
            dst.write(src.read())
    return {"lm": lm, "tower": tower_model, "connector": projector}


def tinyllava_logits(parts, ids, pixel_values):
    """TinyLLaVA's forward: tower hidden states at layer -2 minus the first position, the Linear-GELU-Linear
    connector, the features spliced into the text embeddings at the -200 placeholder."""
    features = parts["tower"](pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]
    image = parts["connector"](features)[0]
    at = ids.index(-200)
    embed = parts["lm"].get_input_embeddings()
    sequence = torch.cat([embed(torch.tensor(ids[:at])), image, embed(torch.tensor(ids[at + 1:]))])
    return parts["lm"](inputs_embeds=sequence[None]).logits[0]


# ------------------------------------------------------------------------------------------ fixtures


def rendered_texts(demo_assets):
    with open(os.path.join(demo_assets["data"], "raw", "train.json")) as f:
        records = json.load(f)
    return [tinyllava_prompt(r["conversations"]) for r in records]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory, demo_assets):
    """Qwen2-style and Qwen2.5-style tokenizers: the same BPE and first special tokens, more specials in Qwen2.5."""
    root = tmp_path_factory.mktemp("tokenizers")
    texts = rendered_texts(demo_assets)
    qwen2 = write_qwen2_tokenizer(str(root / "qwen2"), texts, QWEN2_SPECIALS)
    qwen25 = write_qwen2_tokenizer(str(root / "qwen25"), texts, QWEN25_SPECIALS)
    return {"qwen2": qwen2, "qwen25": qwen25}


def table_rows(tokenizer_dir, free_row=True):
    length = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    return -(-(length + 8) // 64) * 64 if free_row else length


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tokenizers):
    """The paper's pair in miniature, as TinyLLaVA checkpoints: a Qwen2.5-style teacher with an untied head and a
    Qwen2-style student with a tied head (like Qwen2-0.5B), both tables with free rows; and their conversions."""
    root = tmp_path_factory.mktemp("pair")
    rows = table_rows(tokenizers["qwen25"])
    paths = {"teacher_tl": str(root / "teacher_tl"), "student_tl": str(root / "student_tl"),
             "teacher": str(root / "teacher_hf"), "student": str(root / "student_hf")}
    parts = {"teacher": write_tinyllava(paths["teacher_tl"], tokenizers["qwen25"], text=TEACHER, tied=False,
                                        vocab_size=rows, seed=0),
             "student": write_tinyllava(paths["student_tl"], tokenizers["qwen2"], text=STUDENT, tied=True,
                                        vocab_size=rows, seed=1)}
    for role in ("teacher", "student"):
        tinyllava_to_hf(paths[f"{role}_tl"], paths[role])
    return paths, parts


def an_image(seed=0, size=(IMAGE_SIZE, IMAGE_SIZE)):
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (size[1], size[0], 3), dtype=np.uint8))


# ------------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("tied, free_row", [(True, True), (False, False)], ids=["tied-free-row", "untied-new-row"])
def test_a_tinyllava_checkpoint_converts_to_llava_with_tinyllavas_forward(tmp_path, tokenizers, tied, free_row):
    rows = table_rows(tokenizers["qwen2"], free_row)
    parts = write_tinyllava(str(tmp_path / "tl"), tokenizers["qwen2"], text=STUDENT, tied=tied, vocab_size=rows)
    tinyllava_to_hf(str(tmp_path / "tl"), str(tmp_path / "hf"))

    hf = str(tmp_path / "hf")
    model = LlavaForConditionalGeneration.from_pretrained(hf).eval()
    tokenizer = AutoTokenizer.from_pretrained(hf)
    original = AutoTokenizer.from_pretrained(str(tmp_path / "tl"))
    config = model.config
    assert (config.vision_feature_layer, config.vision_feature_select_strategy) == (-2, "default")
    assert image_token_count(config) == IMAGE_TOKENS == config.image_seq_length
    assert (config.projector_hidden_act, config.multimodal_projector_bias) == ("gelu", True)
    assert config.image_token_id == len(original) == tokenizer.convert_tokens_to_ids("<image>")
    assert len(tokenizer) == len(original) + 1
    assert config.text_config.vocab_size == (rows if free_row else rows + 1)
    assert (model.lm_head.weight is model.model.language_model.embed_tokens.weight) == tied
    # The processor expands <image> to the count the model consumes.
    processor = LlavaProcessor.from_pretrained(hf)
    ids = processor(text="<image>\nWhat is it?", images=[an_image()], return_tensors="pt")["input_ids"][0]
    assert int((ids == config.image_token_id).sum()) == IMAGE_TOKENS

    conversation = [{"from": "human", "value": "<image>\nWhat color is the shape?"}, {"from": "gpt", "value": "red"},
                    {"from": "human", "value": "And its shape?"}, {"from": "gpt", "value": "square"}]
    prompt = tinyllava_prompt(conversation)
    tinyllava_ids = tinyllava_image_ids(prompt, original)
    pixel_values = load_image_processor(hf)(images=[an_image()], return_tensors="pt")["pixel_values"]
    llava_ids, _ = expand_image(tinyllava_ids, tinyllava_ids, config.image_token_id)
    with torch.no_grad():
        expected = tinyllava_logits(parts, tinyllava_ids, pixel_values)
        logits = model(input_ids=torch.tensor([llava_ids]), pixel_values=pixel_values).logits[0]
    assert logits.shape[0] == expected.shape[0] == len(llava_ids)
    torch.testing.assert_close(logits[:, :rows], expected, rtol=1e-5, atol=1e-5)


def test_siglip_so400m_gives_728_image_tokens(tmp_path, tokenizers):
    """TinyLLaVA's "patch" drops the first position of SigLIP's 27 x 27 patches, though it is no class token."""
    write_tinyllava(str(tmp_path), tokenizers["qwen2"], text=STUDENT, tied=True,
                    vocab_size=table_rows(tokenizers["qwen2"]))
    source = read_config(str(tmp_path))
    source["vision_config"] |= {"image_size": 384, "patch_size": 14}
    assert image_token_count(llava_config(source)) == 728


def state_of(directory):
    state = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            state |= load_file(os.path.join(directory, name))
    return state


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def read_config(directory):
    with open(os.path.join(directory, "config.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("tied, free_row", [(True, True), (False, False)], ids=["tied-free-row", "untied-new-row"])
def test_the_round_trip_is_exact(tmp_path, tokenizers, tied, free_row):
    rows = table_rows(tokenizers["qwen2"], free_row)
    a, b, c, d = (str(tmp_path / name) for name in "abcd")
    write_tinyllava(a, tokenizers["qwen2"], text=STUDENT, tied=tied, vocab_size=rows, dtype=torch.bfloat16, shards=2)
    tinyllava_to_hf(a, b)
    hf_to_tinyllava(b, c)
    tinyllava_to_hf(c, d)

    assert_same_state(state_of(a), state_of(c))  # in -> out: TinyLLaVA's tensors and names
    assert read_config(c) == read_config(a)  # and its config values
    assert_same_state(state_of(b), state_of(d))  # out -> in again: the same Llava checkpoint
    assert read_config(d) == read_config(b)
    assert AutoTokenizer.from_pretrained(c).get_vocab() == AutoTokenizer.from_pretrained(a).get_vocab()
    assert AutoTokenizer.from_pretrained(c).chat_template == CHATML
    assert AutoTokenizer.from_pretrained(d).get_vocab() == AutoTokenizer.from_pretrained(b).get_vocab()
    with open(os.path.join(c, "preprocessor_config.json")) as f:
        tower = json.load(f)
    assert tower["image_processor_type"] == "SiglipImageProcessor"
    assert tower["size"] == {"height": IMAGE_SIZE, "width": IMAGE_SIZE}


def test_a_llava_model_never_converted_goes_to_tinyllava_with_the_names_given(tmp_path, demo_assets):
    """The demo student (features at layer -1, all positions) as a TinyLLaVA checkpoint, and back unchanged."""
    tl, hf = str(tmp_path / "tl"), str(tmp_path / "hf")
    hf_to_tinyllava(demo_assets["student"], tl, llm="Qwen/Qwen2-0.5B", vision_tower="google/siglip-so400m-patch14-384")
    config = read_config(tl)
    assert {k: config[k] for k in ("model_type", "connector_type", "vision_feature_layer",
                                   "vision_feature_select_strategy", "llm_model_name_or_path",
                                   "tokenizer_name_or_path", "vision_model_name_or_path", "image_token_index")} == {
        "model_type": "tinyllava", "connector_type": "mlp2x_gelu", "vision_feature_layer": -1,
        "vision_feature_select_strategy": "cls_patch", "llm_model_name_or_path": "Qwen/Qwen2-0.5B",
        "tokenizer_name_or_path": "Qwen/Qwen2-0.5B", "vision_model_name_or_path": "google/siglip-so400m-patch14-384",
        "image_token_index": -200}
    assert config["text_config"]["rope_theta"] == AutoConfig.from_pretrained(
        demo_assets["student"]).text_config.rope_parameters["rope_theta"]  # as transformers 4.x reads RoPE
    assert all(k.startswith(("language_model.", "vision_tower._vision_tower.vision_model.", "connector._connector."))
               for k in state_of(tl))
    tinyllava_to_hf(tl, hf)
    assert_same_state(state_of(demo_assets["student"]), state_of(hf))
    before, after = AutoConfig.from_pretrained(demo_assets["student"]), AutoConfig.from_pretrained(hf)
    assert (after.image_token_id, after.vision_feature_select_strategy) == (before.image_token_id, "full")
    assert {**after.text_config.to_dict(), "dtype": None} == {**before.text_config.to_dict(), "dtype": None}


CONVERSATIONS = [
    [{"from": "human", "value": "<image>\nWhat color is the shape?"}, {"from": "gpt", "value": "red"},
     {"from": "human", "value": "How many shapes are there?"}, {"from": "gpt", "value": "3"},
     {"from": "human", "value": "Where is it?\n"}, {"from": "gpt", "value": "left\nof the square"}],
    [{"from": "human", "value": "Which digit is shown?\n<image>"}, {"from": "gpt", "value": " 7 "},
     {"from": "human", "value": "  What is the sum of the digits?"}, {"from": "gpt", "value": "12."}],
    [{"from": "human", "value": "What is 2 + 3?"}, {"from": "gpt", "value": "5"}],
    [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "A circle: it's blue."}],
]


@pytest.mark.parametrize("template, end", [("qwen2_base", "<|endoftext|>"), ("qwen2_instruct", "<|im_end|>")])
def test_the_chat_template_trains_on_tinyllavas_token_ids(tmp_path, tokenizers, template, end):
    write_tinyllava(str(tmp_path / "tl"), tokenizers["qwen2"], text=STUDENT, tied=True,
                    vocab_size=table_rows(tokenizers["qwen2"]))
    tinyllava_to_hf(str(tmp_path / "tl"), str(tmp_path / "hf"), template=template)
    original = AutoTokenizer.from_pretrained(str(tmp_path / "tl"))
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    for conversation in CONVERSATIONS:
        prompt = tinyllava_prompt(conversation, end)
        ids = tinyllava_image_ids(prompt, original)
        expected_ids, expected_labels = expand_image(ids, tinyllava_labels(ids, prompt, original, end), image_id)
        encoded = encode_conversation(conversation, tokenizer, num_image_tokens=IMAGE_TOKENS, max_length=4096,
                                      template="tokenizer")
        assert encoded["input_ids"].tolist() == expected_ids
        assert encoded["labels"].tolist() == expected_labels
        # Generation: TinyLLaVA's eval prompt ends with "ASSISTANT:" (the answer brings its own space).
        generation = tinyllava_prompt(conversation[:-1] + [{"from": "gpt", "value": None}], end)
        expected_prompt, _ = expand_image(*[tinyllava_image_ids(generation, original)] * 2, image_id)
        prompt_ids = encode_prompt(conversation, tokenizer, num_image_tokens=IMAGE_TOKENS, template="tokenizer")
        assert prompt_ids["input_ids"].tolist() == expected_prompt
    # The processor's template takes Hugging Face's content parts and renders them the same way.
    processor = LlavaProcessor.from_pretrained(str(tmp_path / "hf"))
    parts = [{"role": "user", "content": [{"type": "text", "text": "What color is it?"}, {"type": "image"}]}]
    assert processor.apply_chat_template(parts, add_generation_prompt=True) == \
        f"{SYSTEM} USER: <image>\nWhat color is it? ASSISTANT:"


def expand_to_square(image, color):
    """TinyLLaVA's ImagePreprocess.expand2square: the image centred on a square of the background colour."""
    width, height = image.size
    side = max(width, height)
    result = Image.new(image.mode, (side, side), color)
    result.paste(image, (0, (side - height) // 2) if width > height else ((side - width) // 2, 0))
    return result


def test_pad_aspect_ratio_pads_to_a_square_of_the_mean_colour(tmp_path, tokenizers):
    write_tinyllava(str(tmp_path / "tl"), tokenizers["qwen2"], text=STUDENT, tied=True,
                    vocab_size=table_rows(tokenizers["qwen2"]), aspect="pad")
    tinyllava_to_hf(str(tmp_path / "tl"), str(tmp_path / "hf"))
    processor = load_image_processor(str(tmp_path / "hf"))
    tower = SiglipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})  # what TinyLLaVA pads for
    mean_colour = tuple(int(x * 255) for x in tower.image_mean)
    for size in ((45, 20), (20, 45), (32, 32)):
        image = an_image(1, size)
        expected = tower(images=[expand_to_square(image, mean_colour)], return_tensors="pt")["pixel_values"]
        assert torch.equal(processor(images=[image], return_tensors="pt")["pixel_values"], expected), size
    hf_to_tinyllava(str(tmp_path / "hf"), str(tmp_path / "back"))
    assert read_config(str(tmp_path / "back"))["image_aspect_ratio"] == "pad"


def leftovers(parent):
    return sorted(name for name in os.listdir(parent) if ".partial-" in name)


@pytest.mark.parametrize("connector, reason", [
    ("linear", r"connector_type 'linear' \(one Linear layer\) cannot be converted: transformers' "
               r"LlavaMultiModalProjector is exactly Linear-GELU-Linear"),
    ("mlp3x_gelu", r"connector_type 'mlp3x_gelu' \(3 Linear layers with GELU between them\) cannot be converted"),
    ("resampler", r"connector_type 'resampler' \(not a Linear-GELU-Linear stack\) cannot be converted"),
])
def test_an_unsupported_connector_stops_and_writes_nothing(tmp_path, tokenizers, connector, reason, capsys):
    write_tinyllava(str(tmp_path / "tl"), tokenizers["qwen2"], text=STUDENT, tied=True,
                    vocab_size=table_rows(tokenizers["qwen2"]), connector=connector)
    with pytest.raises(SystemExit, match=f"^convert: {reason}"):
        main(["tinyllava-to-hf", str(tmp_path / "tl"), str(tmp_path / "hf")])
    assert not os.path.exists(tmp_path / "hf") and not leftovers(tmp_path)


def test_other_directories_and_missing_shards_stop_and_write_nothing(tmp_path, tokenizers, demo_assets):
    tl = str(tmp_path / "tl")
    write_tinyllava(tl, tokenizers["qwen2"], text=STUDENT, tied=True, vocab_size=table_rows(tokenizers["qwen2"]),
                    shards=2)
    cases = [
        (["tinyllava-to-hf", demo_assets["student"]],
         f"{demo_assets['student']} is not a TinyLLaVA checkpoint: config.json has model_type 'llava', "
         "expected 'tinyllava'"),
        (["tinyllava-to-hf", str(tmp_path)], f"{tmp_path} is not a TinyLLaVA checkpoint: no config.json"),
        (["hf-to-tinyllava", tl], f"{tl} is not a Llava checkpoint: config.json has model_type 'tinyllava', "
                                  "expected 'llava'"),
        (["hf-to-tinyllava", demo_assets["student"]], f"{demo_assets['student']} was not converted from TinyLLaVA: "
                                                      "give --llm and --vision-tower"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as stop:
            main([*args, str(tmp_path / "out")])
        assert str(stop.value.code).startswith(f"convert: {message}"), stop.value.code
        assert "\n" not in str(stop.value.code)
    bare = str(tmp_path / "bare")
    os.makedirs(bare)
    for name in ("config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors",
                 "model-00002-of-00002.safetensors"):
        os.link(os.path.join(tl, name), os.path.join(bare, name))
    with pytest.raises(SystemExit, match=rf"^convert: no usable tokenizer in '{bare}'.*; pass --tokenizer DIR "
                                         r"\(config.json names 'Qwen/Qwen2-0.5B'\)$"):
        main(["tinyllava-to-hf", bare, str(tmp_path / "out")])
    os.remove(os.path.join(tl, "model-00002-of-00002.safetensors"))
    with pytest.raises(SystemExit, match=r"^convert: missing shard .*model-00002-of-00002.safetensors \(1 of 2"):
        main(["tinyllava-to-hf", tl, str(tmp_path / "out")])
    vision = read_config(tl)
    vision["vision_config"]["model_type"] = "dinov2"
    with open(os.path.join(tl, "config.json"), "w") as f:
        json.dump(vision, f)
    with pytest.raises(SystemExit, match=r"^convert: vision tower 'dinov2' .* cannot be converted"):
        main(["tinyllava-to-hf", tl, str(tmp_path / "out")])
    assert not os.path.exists(tmp_path / "out") and not leftovers(tmp_path)
    # A destination holding something is never written over.
    os.makedirs(tmp_path / "taken")
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit, match="already exists and is not empty"):
        main(["hf-to-tinyllava", demo_assets["student"], str(tmp_path / "taken"), "--llm", "Qwen/Qwen2-0.5B",
              "--vision-tower", "google/siglip-so400m-patch14-384"])
    assert os.listdir(tmp_path / "taken") == ["keep.txt"]


def test_the_paper_pairs_tokenizers_are_reconciled(pair):
    paths, _ = pair
    teacher_cfg, student_cfg = (AutoConfig.from_pretrained(paths[role]) for role in ("teacher", "student"))
    teacher_tok, student_tok = (AutoTokenizer.from_pretrained(paths[role]) for role in ("teacher", "student"))
    # Qwen2.5-style: 4 more special tokens, so <image> sits 4 ids higher than in the student's tokenizer.
    assert teacher_cfg.image_token_id == student_cfg.image_token_id + 4
    with pytest.raises(IncompatiblePair, match="image token id"):
        check_pair(teacher_cfg, student_cfg)  # without tokenizers nothing shows the ids are safe
    result = check_pair(teacher_cfg, student_cfg, teacher_tok, student_tok)
    assert result.shared_vocab == student_cfg.text_config.vocab_size
    assert result.image_token_id == student_cfg.image_token_id
    notes = "\n".join(result.notes)
    assert f"the student's id {student_cfg.image_token_id} marks image positions in both passes" in notes
    assert (f"the teacher's tokenizer has '<|object_ref_start|>' there, its own image token is "
            f"{teacher_cfg.image_token_id}") in notes
    # Its other extra tokens (and its own <image>) are ids the student's tokenizer never produces.
    assert (f"the teacher's tokenizer has 4 tokens the student's tokenizer never produces (ids "
            f"{student_cfg.image_token_id + 1}-{teacher_cfg.image_token_id}: '<|object_ref_end|>'") in notes

    # A teacher table with more rows: compared over the student's, which holds every id its tokenizer produces.
    wide = copy.deepcopy(teacher_cfg)
    wide.text_config.vocab_size += 64
    assert check_pair(wide, student_cfg, teacher_tok, student_tok).shared_vocab == student_cfg.text_config.vocab_size

    # A real difference still stops: two BPE tokens swapped in the teacher's tokenizer.
    vocab = teacher_tok.get_vocab()
    first, second = sorted(vocab, key=vocab.get)[300:302]
    swapped = os.path.join(paths["teacher_tl"], "..", "swapped")
    teacher_tok.save_pretrained(swapped)
    with open(os.path.join(swapped, "tokenizer.json")) as f:
        backend = json.load(f)
    table = backend["model"]["vocab"]
    table[first], table[second] = table[second], table[first]
    with open(os.path.join(swapped, "tokenizer.json"), "w") as f:
        json.dump(backend, f)
    with pytest.raises(IncompatiblePair, match=rf"token ids differ for 2 of the student tokenizer's ids \(e.g. id "
                                               rf"{vocab[first]}: student '.*' vs teacher '.*'"):
        check_pair(teacher_cfg, student_cfg, AutoTokenizer.from_pretrained(swapped), student_tok)
    # And a student tokenizer producing ids the teacher's lacks.
    with pytest.raises(IncompatiblePair, match="tokenizer length: teacher"):
        check_pair(student_cfg, teacher_cfg, student_tok, teacher_tok)


@pytest.mark.slow
def test_the_converted_pair_distils_and_converts_back(tmp_path, pair, demo_assets):
    import yaml

    paths, _ = pair
    out = str(tmp_path / "run")
    config = {"output_dir": out, "seed": 0, "max_steps": 3, "save_every": 3, "keep_checkpoints": 1,
              "student": {"path": paths["student"]}, "teacher": {"path": paths["teacher"]},
              "data": {"train": [demo_assets["train"]], "max_length": 256, "num_workers": 0},
              "micro_batch_size": 4, "grad_accum": 1, "zero_stage": 2,
              "optim": {"lr": 2e-3, "warmup_steps": 1}, "loss": {"candidates": 16}}
    with open(tmp_path / "run.yaml", "w") as f:
        yaml.safe_dump(config, f)
    proc = run_module(["-m", "recipe.train", "--config", str(tmp_path / "run.yaml")],
                      env={"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}, timeout=300)
    assert "marks image positions in both passes" in proc.stdout
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["ce"] > 0 and r["align"] > 0 and r["vsd"] > 0 for r in records)

    # The distilled student back in TinyLLaVA's format: its layout, the trained weights.
    back = str(tmp_path / "student_tl")
    hf_to_tinyllava(os.path.join(out, "final"), back)
    start, end = state_of(paths["student_tl"]), state_of(back)
    assert start.keys() == end.keys()
    assert any(not torch.equal(start[k], end[k]) for k in start)
    assert read_config(back) == read_config(paths["student_tl"])
    assert SOURCE_KEY in read_config(os.path.join(out, "final"))
