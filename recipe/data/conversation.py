"""LLaVA conversation -> token ids and labels.

The conversation is rendered with a chat template turn by turn. Successive renderings are prefixes
of each other, so their differences split the text into pieces that each belong to one part of the
conversation: the prompt up to and including an assistant header ("<|im_start|>assistant\\n"), the
answer plus its end-of-turn token ("...<|im_end|>"), and the whitespace after it ("\\n"). Pieces are
tokenized separately, so the tokens of each piece are known exactly. Only answer pieces are
supervised. Labels are not shifted (the model shifts them, HF convention).

The image tag must be one special token of the tokenizer (same string, "<image>"); it is expanded
to `num_image_tokens` copies that the model replaces with projected visual features.
"""

import torch

from recipe.config import ChatTemplate, choices

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


def render_chatml(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """Qwen2 ChatML, with Qwen2's default system prompt when the conversation has none."""
    has_system = bool(messages) and messages[0]["role"] == "system"
    text = "" if has_system else f"<|im_start|>system\n{CHATML_SYSTEM_PROMPT}<|im_end|>\n"
    for message in messages:
        text += f"<|im_start|>{message['role']}\n{message['content']}<|im_end|>\n"
    if add_generation_prompt:
        text += "<|im_start|>assistant\n"
    return text


def chat_renderer(tokenizer, template: ChatTemplate = "auto"):
    """render(messages, add_generation_prompt) -> str. "auto": the tokenizer's chat template when it
    has one, else ChatML; "tokenizer": the tokenizer's (must exist); "chatml": ChatML."""
    if template not in choices(ChatTemplate):
        raise ValueError(f"unknown template {template!r}; choose from {choices(ChatTemplate)}")
    if template == "auto":
        template = "tokenizer" if getattr(tokenizer, "chat_template", None) else "chatml"
    if template == "chatml":
        return render_chatml
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("template='tokenizer' but the tokenizer has no chat_template")

    def render(messages, add_generation_prompt=False):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    return render


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


def _tokenize_pieces(pieces, tokenizer, image_token: str, num_image_tokens: int):
    """Token ids and labels of the pieces, with each image token expanded to num_image_tokens copies."""
    if num_image_tokens < 1:
        raise ValueError(f"num_image_tokens must be >= 1, got {num_image_tokens}")
    image_id = image_token_id(tokenizer, image_token)
    encoded = tokenizer([text for text, _ in pieces], add_special_tokens=False)["input_ids"]
    input_ids, labels = [], []
    for (_, supervised), ids in zip(pieces, encoded):
        for token in ids:
            copies = num_image_tokens if token == image_id else 1
            input_ids += [token] * copies
            labels += [token if supervised and token != image_id else IGNORE_INDEX] * copies
    return input_ids, labels, image_id


def encode_conversation(
    conversations: list[dict],
    tokenizer,
    *,
    image_token: str = "<image>",
    num_image_tokens: int,
    max_length: int,
    template: str = "auto",
) -> dict:
    """LLaVA turns -> {"input_ids": LongTensor[T], "labels": LongTensor[T]}, T <= max_length.

    Labels are the token ids on assistant answers and their end-of-turn token, -100 elsewhere.
    Too long: cut at the end; raises DroppedSample("image_truncated") when the cut would remove any
    image token, DroppedSample("no_supervised_tokens") when no answer token is left.
    """
    pieces = split_rendering(to_messages(conversations), chat_renderer(tokenizer, template))
    input_ids, labels, image_id = _tokenize_pieces(pieces, tokenizer, image_token, num_image_tokens)
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
    num_image_tokens: int,
    max_length: int | None = None,
    template: str = "auto",
) -> dict:
    """For generation: {"input_ids": LongTensor[T], "answer": str}.

    input_ids = everything up to and including the last assistant header (earlier rounds, with
    their answers, included), token for token what encode_conversation gives for that prefix;
    answer = the final gpt turn's text (the reference). Raises DroppedSample("prompt_too_long")
    when max_length is given and exceeded (a prompt is never cut).
    """
    if not conversations or conversations[-1].get("from") != "gpt":
        raise ValueError("encode_prompt needs a conversation that ends with a gpt turn (the reference answer)")
    pieces = split_rendering(to_messages(conversations), chat_renderer(tokenizer, template))
    last_answer = max(i for i, (_, supervised) in enumerate(pieces) if supervised)
    input_ids, _, _ = _tokenize_pieces(pieces[:last_answer], tokenizer, image_token, num_image_tokens)
    if max_length is not None and len(input_ids) > max_length:
        raise DroppedSample("prompt_too_long", f"{len(input_ids)} tokens > max_length {max_length}")
    return {"input_ids": torch.tensor(input_ids, dtype=torch.long), "answer": conversations[-1]["value"]}
