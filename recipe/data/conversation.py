"""LLaVA conversation -> token ids and labels.

The conversation is rendered with a chat template turn by turn. Successive renderings are prefixes
of each other, so their differences split the text into pieces that each belong to one part of the
conversation: the prompt up to and including an assistant header ("<|im_start|>assistant\\n"), the
answer plus its end-of-turn token ("...<|im_end|>"), and the whitespace after it ("\\n"). Pieces are
tokenized separately, so the tokens of each piece are known exactly. Only answer pieces are
supervised. Labels are not shifted (the model shifts them, HF convention).

Two message formats (the model family's `message_format`, recipe/models/families):
- "text" (LLaVA): the `<image>` tag stays in the plain-string content; the image tag must be one special token
  of the tokenizer (same string), expanded to `num_image_tokens` copies.
- "multimodal" (every other family): each `<image>` tag becomes an HF content item {"type": "image"} and the
  model's own chat template places its image token; `image_ids` gives, per image, the ids that token expands to
  (what the family's processor writes: placeholders plus e.g. <img>...</img> or tile tags).
Either way the model replaces the image tokens with projected visual features.
"""

import torch

from recipe.config import ChatTemplate, choices
from recipe.data.validate import IMAGE_TAG

IGNORE_INDEX = -100
CHATML_SYSTEM_PROMPT = "You are a helpful assistant."
ROLE_NAMES = {"human": "user", "gpt": "assistant"}


class DroppedSample(Exception):
    """A sample that cannot be used as is; `reason`: "image_truncated", "no_supervised_tokens", "prompt_too_long"."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def to_messages(conversations: list[dict]) -> list[dict]:
    """LLaVA turns ({"from": "human"/"gpt", "value"}) -> chat messages ({"role": "user"/"assistant", "content"})."""
    messages = []
    for turn in conversations:
        if turn.get("from") not in ROLE_NAMES:
            raise ValueError(f"unknown turn role {turn.get('from')!r}; expected 'human' or 'gpt'")
        messages.append({"role": ROLE_NAMES[turn["from"]], "content": turn["value"]})
    return messages


def to_multimodal_messages(conversations: list[dict], image_tag: str = IMAGE_TAG) -> list[dict]:
    """LLaVA turns -> HF multimodal chat messages: content is a list of {"type": "text", "text"} and
    {"type": "image"} items, one image item where each `image_tag` was (the text around it kept as is)."""
    messages = []
    for message in to_messages(conversations):
        content = []
        for k, text in enumerate(message["content"].split(image_tag)):
            if k:
                content.append({"type": "image"})
            if text:
                content.append({"type": "text", "text": text})
        messages.append({"role": message["role"], "content": content})
    return messages


def render_chatml(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """Qwen2 ChatML, with Qwen2's default system prompt when the conversation has none."""
    has_system = bool(messages) and messages[0]["role"] == "system"
    text = "" if has_system else f"<|im_start|>system\n{CHATML_SYSTEM_PROMPT}<|im_end|>\n"
    for message in messages:
        text += f"<|im_start|>{message['role']}\n{message['content']}<|im_end|>\n"
    if add_generation_prompt:
        text += "<|im_start|>assistant\n"
    return text


def chat_renderer(tokenizer, template: ChatTemplate = "auto", chat_template: str | None = None):
    """render(messages, add_generation_prompt) -> str. "auto": `chat_template` (the processor's, for multimodal
    messages) when given, else the tokenizer's chat template when it has one, else ChatML; "tokenizer": the
    tokenizer's (must exist); "chatml": ChatML (text messages only)."""
    if template not in choices(ChatTemplate):
        raise ValueError(f"unknown template {template!r}; choose from {choices(ChatTemplate)}")
    if template == "auto" and chat_template:
        return _template_renderer(tokenizer, chat_template)
    if template == "auto":
        template = "tokenizer" if getattr(tokenizer, "chat_template", None) else "chatml"
    if template == "chatml":
        return render_chatml
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("template='tokenizer' but the tokenizer has no chat_template")
    return _template_renderer(tokenizer, None)


def _template_renderer(tokenizer, chat_template: str | None):
    def render(messages, add_generation_prompt=False):
        return tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)

    return render


def _messages(conversations: list[dict], message_format: str) -> list[dict]:
    if message_format == "text":
        return to_messages(conversations)
    if message_format == "multimodal":
        return to_multimodal_messages(conversations)
    raise ValueError(f"message_format must be 'text' or 'multimodal', got {message_format!r}")


def multimodal_chat_template(template: str, image_text: str = IMAGE_TAG) -> str:
    """A chat template that also takes HF's multimodal messages (content: a list of {"type": "image"} and
    {"type": "text", "text"} items), built from a text-only one: list content is first joined into a string
    (`image_text` per image item), then `template` renders the messages as before, so plain-string content
    renders exactly as with `template`. A template that already takes lists is returned as it is."""
    if renders_multimodal(template):
        return template
    flatten = (
        "{%- set flat = namespace(messages=[]) -%}"
        "{%- for message in messages -%}"
        "{%- if message['content'] is string -%}{%- set flat.messages = flat.messages + [message] -%}"
        "{%- else -%}{%- set text = namespace(value='') -%}"
        "{%- for item in message['content'] -%}"
        "{%- if item['type'] == 'image' -%}{%- set text.value = text.value + " + repr(image_text) + " -%}"
        "{%- elif item['type'] == 'text' -%}{%- set text.value = text.value + item['text'] -%}{%- endif -%}"
        "{%- endfor -%}"
        "{%- set flat.messages = flat.messages + [{'role': message['role'], 'content': text.value}] -%}"
        "{%- endif -%}{%- endfor -%}"
        "{%- set messages = flat.messages -%}"
    )
    return flatten + template


def renders_multimodal(template: str) -> bool:
    """Whether a chat template renders a user message with an image item and a text item without error, and
    shows the text."""
    from transformers.utils.chat_template_utils import render_jinja_template

    probe = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "probe-text"}]}]
    try:
        rendered, _ = render_jinja_template(conversations=[probe], chat_template=template)
    except Exception:  # jinja raises many kinds (TypeError on str + list, UndefinedError...): all mean no
        return False
    return "probe-text" in rendered[0]


def split_rendering(messages: list[dict], render) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, supervised) pieces whose concatenation is the full text.

    Per assistant message: (prompt so far incl. its header, False), (answer + end-of-turn token,
    True), (trailing whitespace such as "\\n", False).
    """
    pieces, done = [], ""
    for k, message in enumerate(messages):
        if message["role"] == "assistant":
            with_header = _extend(done, render(messages[:k], add_generation_prompt=True))
            pieces.append((with_header[len(done) :], False))
            done = with_header
            full = _extend(done, render(messages[: k + 1]))
            answer = full[len(done) :].rstrip()  # answer + end-of-turn token, without the "\n" after it
            pieces += [(answer, True), (full[len(done) + len(answer) :], False)]
        else:
            full = _extend(done, render(messages[: k + 1]))
            pieces.append((full[len(done) :], False))
        done = full
    return [(text, supervised) for text, supervised in pieces if text]


def _extend(prefix: str, text: str) -> str:
    if not text.startswith(prefix):
        raise ValueError(
            "the chat template does not render conversations prefix-consistently (a later turn changes "
            "the text of earlier ones), so answer tokens cannot be located; use template='chatml'"
        )
    return text


def image_token_id(tokenizer, image_token: str) -> int:
    """Id of the image placeholder, which must be a single (special) token of the tokenizer."""
    ids = tokenizer.encode(image_token, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"tokenizer has no single token for {image_token!r}; add it as a special token")
    return ids[0]


def _tokenize_pieces(pieces, tokenizer, image_token: str, num_image_tokens: int | None,
                     image_ids: list[list[int]] | None):
    """Token ids and labels of the pieces, with each image token expanded: to num_image_tokens copies, or to
    image_ids[k] for the k-th image."""
    if image_ids is None and (num_image_tokens is None or num_image_tokens < 1):
        raise ValueError(f"num_image_tokens must be >= 1, got {num_image_tokens}")
    image_id = image_token_id(tokenizer, image_token)
    encoded = tokenizer([text for text, _ in pieces], add_special_tokens=False)["input_ids"]
    input_ids, labels, images = [], [], 0
    for (_, supervised), ids in zip(pieces, encoded):
        for token in ids:
            if token != image_id:
                input_ids.append(token)
                labels.append(token if supervised else IGNORE_INDEX)
                continue
            if image_ids is None:
                expansion = [image_id] * num_image_tokens
            elif images < len(image_ids):
                expansion = image_ids[images]
            else:
                raise ValueError(f"the rendered conversation has more {image_token} tokens than its "
                                 f"{len(image_ids)} image(s)")
            images += 1
            input_ids += expansion
            labels += [IGNORE_INDEX] * len(expansion)
    if image_ids is not None and images != len(image_ids):
        raise ValueError(f"{len(image_ids)} image(s) but the rendered conversation has {images} {image_token} "
                         f"tokens (does the chat template place an image token for {{'type': 'image'}}?)")
    return input_ids, labels, image_id


def encode_conversation(
    conversations: list[dict],
    tokenizer,
    *,
    image_token: str = "<image>",
    num_image_tokens: int | None = None,
    image_ids: list[list[int]] | None = None,
    max_length: int,
    template: str = "auto",
    message_format: str = "text",
    chat_template: str | None = None,
) -> dict:
    """LLaVA turns -> {"input_ids": LongTensor[T], "labels": LongTensor[T]}, T <= max_length.

    Labels are the token ids on assistant answers and their end-of-turn token, -100 elsewhere.
    image_token: the model's image token; num_image_tokens or image_ids: its expansion (module docstring);
    message_format, chat_template: how the turns are rendered (module docstring, chat_renderer).
    Too long: cut at the end; raises DroppedSample("image_truncated") when the cut would remove any
    image token, DroppedSample("no_supervised_tokens") when no answer token is left.
    """
    pieces = split_rendering(_messages(conversations, message_format),
                             chat_renderer(tokenizer, template, chat_template))
    input_ids, labels, image_id = _tokenize_pieces(pieces, tokenizer, image_token, num_image_tokens, image_ids)
    if len(input_ids) > max_length:
        if image_id in input_ids[max_length:]:
            raise DroppedSample("image_truncated", f"{len(input_ids)} tokens > max_length {max_length}")
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        raise DroppedSample("no_supervised_tokens")
    return {"input_ids": torch.tensor(input_ids, dtype=torch.long), "labels": torch.tensor(labels, dtype=torch.long)}


def encode_prompt(
    conversations: list[dict],
    tokenizer,
    *,
    image_token: str = "<image>",
    num_image_tokens: int | None = None,
    image_ids: list[list[int]] | None = None,
    max_length: int | None = None,
    template: str = "auto",
    message_format: str = "text",
    chat_template: str | None = None,
) -> dict:
    """For generation: {"input_ids": LongTensor[T], "answer": str}.

    input_ids = everything up to and including the last assistant header (earlier rounds, with
    their answers, included), token for token what encode_conversation gives for that prefix;
    answer = the final gpt turn's text (the reference). Raises DroppedSample("prompt_too_long")
    when max_length is given and exceeded (a prompt is never cut).
    """
    if not conversations or conversations[-1].get("from") != "gpt":
        raise ValueError("encode_prompt needs a conversation that ends with a gpt turn (the reference answer)")
    pieces = split_rendering(_messages(conversations, message_format),
                             chat_renderer(tokenizer, template, chat_template))
    last_answer = max(i for i, (_, supervised) in enumerate(pieces) if supervised)
    input_ids, _, _ = _tokenize_pieces(pieces[:last_answer], tokenizer, image_token, num_image_tokens, image_ids)
    if max_length is not None and len(input_ids) > max_length:
        raise DroppedSample("prompt_too_long", f"{len(input_ids)} tokens > max_length {max_length}")
    return {"input_ids": torch.tensor(input_ids, dtype=torch.long), "answer": conversations[-1]["value"]}
