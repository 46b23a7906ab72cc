"""Dataset items -> a padded training batch.

Batch dict:
  input_ids       (B, T) long, right-padded with tokenizer.pad_token_id
  attention_mask  (B, T) long, 1 on real tokens
  labels          (B, T) long, -100 on padding and on everything but answers (not shifted)
  pixel_values    float32: the images of the rows with has_image, in row order, as the model takes them
                  (LLaVA: (N_img, 3, H, W); (0, ...) when no row has an image), with the family's other image
                  inputs beside it (its image_keys: e.g. image_grid_thw, pixel_attention_mask, image_sizes)
  teacher_<key>   the same images through the teacher's image processor, only when the collator
                  has one (a teacher that preprocesses differently from the student: docs/method.md's image_T)
  has_image       (B,) bool
  ids             list of B sample ids
  dropped         {reason: count} of items left out of this batch (see conversation.DroppedSample)
  skipped         [{"id", "shard", "index", "reason"}] of items that could not be read (the dataset's
                  SkipUnreadable) or encoded (image tags that do not match, a conversation the chat
                  template cannot render): bad data met at training time, reported in skipped.jsonl

Items that cannot be encoded (too long) are dropped from the batch, not replaced, so B can be
smaller than the number of items - and 0 when all are dropped (input_ids of shape (0, 0)). The
caller skips such a batch (in distributed training: every rank must still take part in the step,
e.g. with a zero-weight loss) and adds `dropped` to its counters. Counting happens per batch
because the collator runs inside DataLoader worker processes, whose state the trainer never sees.
"""

import torch
from jinja2 import TemplateError
from PIL import Image

from recipe.data.conversation import IGNORE_INDEX, DroppedSample, encode_conversation
from recipe.data.dataset import UNREADABLE
from recipe.data.validate import IMAGE_TAG, Reject, check_image_tags

UNRENDERABLE = (ValueError, TemplateError)  # a conversation the chat template cannot render (its raise_exception)


class FixedCountImages:
    """LLaVA-style image inputs without a model config: every image is `num_image_tokens` copies of the image
    token and one image processor output (the same protocol as recipe.models.ImageInputs)."""

    message_format = "text"

    def __init__(self, image_processor, image_token: str, num_image_tokens: int):
        if num_image_tokens is None or num_image_tokens < 1:
            raise ValueError(f"num_image_tokens must be >= 1, got {num_image_tokens}")
        self.image_processor, self.image_token, self.num_image_tokens = image_processor, image_token, num_image_tokens

    def __call__(self, image) -> tuple[str, dict]:
        pixels = self.image_processor(images=[image], return_tensors="pt")["pixel_values"]
        return self.image_token * self.num_image_tokens, {"pixel_values": pixels}

    def collate(self, parts: list[dict]) -> dict:
        return {"pixel_values": torch.cat([p["pixel_values"] for p in parts])}


def _message_format(images) -> str:
    return images.message_format if isinstance(images, FixedCountImages) else images.family.message_format


class Collator:
    """items -> batch (module docstring). The images of one model come from `images` (recipe.models.ImageInputs:
    its family's image processor and token expansion; load_image_inputs builds it), or, LLaVA-style, from
    image_processor + num_image_tokens + image_token_id. teacher_images / teacher_image_processor: the teacher's,
    when it preprocesses differently (its image-token count must be the student's, checked per image).
    chat_template: the model's processor chat template, for the families whose turns are multimodal messages."""

    def __init__(
        self,
        tokenizer,
        image_processor=None,
        *,
        num_image_tokens: int | None = None,
        image_token_id: int | None = None,
        max_length: int,
        template: str = "auto",
        pad_to_multiple_of: int | None = None,
        teacher_image_processor=None,
        images=None,
        teacher_images=None,
        chat_template: str | None = None,
    ):
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token first")
        self.tokenizer = tokenizer
        if images is None:
            image_token = tokenizer.convert_ids_to_tokens(image_token_id)
            images = FixedCountImages(image_processor, image_token, num_image_tokens)
            if teacher_image_processor is not None:
                teacher_images = FixedCountImages(teacher_image_processor, image_token, num_image_tokens)
        self.images, self.teacher_images = images, teacher_images
        self.image_token = images.image_token
        self.message_format = _message_format(images)
        # The data's tag: the image token itself for text messages, "<image>" for multimodal ones.
        self.image_tag = self.image_token if self.message_format == "text" else IMAGE_TAG
        if self.message_format == "multimodal" and template == "chatml":
            raise ValueError("data.template: chatml renders text messages only, and this model family's turns are "
                             "multimodal messages: use auto (the processor's chat template) or tokenizer")
        self.max_length, self.template, self.pad_to_multiple_of = max_length, template, pad_to_multiple_of
        self.chat_template = chat_template
        self._empty = {}  # id(images) -> its tensors for no image, for batches without images

    def __call__(self, items: list[dict]) -> dict:
        rows, images, teacher_images, dropped, skipped = [], [], [], {}, []
        for item in items:
            if UNREADABLE in item:
                skipped.append(_skip_record(item, item[UNREADABLE]))
                continue
            with_image = item.get("image") is not None
            try:
                check_image_tags(item["conversations"], with_image=with_image, image_tag=self.image_tag)
            except Reject as error:
                skipped.append(_skip_record(item, str(error)))
                continue
            image_ids, tensors, teacher_tensors = [], None, None
            if with_image:
                text, tensors = self.images(item["image"])
                image_ids = [self.tokenizer(text, add_special_tokens=False)["input_ids"]]
                if self.teacher_images is not None:
                    teacher_tensors = self._teacher_tensors(item, image_ids[0])
            try:
                encoded = encode_conversation(
                    item["conversations"],
                    self.tokenizer,
                    image_token=self.image_token,
                    image_ids=image_ids,
                    max_length=self.max_length,
                    template=self.template,
                    message_format=self.message_format,
                    chat_template=self.chat_template,
                )
            except DroppedSample as drop:
                dropped[drop.reason] = dropped.get(drop.reason, 0) + 1
                continue
            except UNRENDERABLE as error:
                skipped.append(_skip_record(item, f"chat template: {type(error).__name__}: {error}"))
                continue
            rows.append((item.get("id"), encoded, with_image))
            if with_image:
                images.append(tensors)
                teacher_images.append(teacher_tensors)

        length = max((len(encoded["input_ids"]) for _, encoded, _ in rows), default=0)
        if self.pad_to_multiple_of and length:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(rows), length), self.tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for row, (_, encoded, _) in enumerate(rows):
            n = len(encoded["input_ids"])
            input_ids[row, :n] = encoded["input_ids"]
            labels[row, :n] = encoded["labels"]
            attention_mask[row, :n] = 1
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            **self._image_tensors(self.images, images),
            "has_image": torch.tensor([with_image for _, _, with_image in rows], dtype=torch.bool),
            "ids": [sample_id for sample_id, _, _ in rows],
            "dropped": dropped,
            "skipped": skipped,
        }
        if self.teacher_images is not None:
            teacher = self._image_tensors(self.teacher_images, teacher_images)
            batch.update({"teacher_" + key: value for key, value in teacher.items()})
        return batch

    def _teacher_tensors(self, item: dict, student_ids: list[int]) -> dict:
        """The teacher's tensors for the image; its processor must give the student's image-token count."""
        text, tensors = self.teacher_images(item["image"])
        teacher_ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        image_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        counts = [sum(token == image_id for token in ids) for ids in (teacher_ids, student_ids)]
        if counts[0] != counts[1]:
            raise ValueError(f"sample {item.get('id')!r}: image tokens for this image: teacher {counts[0]} vs student "
                             f"{counts[1]} (their image processors must give the same count: docs/families.md)")
        return tensors

    def _image_tensors(self, images, parts: list[dict]) -> dict:
        if parts:
            return {key: value.float() if value.is_floating_point() else value
                    for key, value in images.collate(parts).items()}
        if id(images) not in self._empty:  # ask the processor once what it makes of an image
            _, probe = images(Image.new("RGB", (8, 8)))
            self._empty[id(images)] = {key: value[:0].float() if value.is_floating_point() else value[:0]
                                       for key, value in probe.items()}
        return self._empty[id(images)]


def _skip_record(item: dict, reason: str) -> dict:
    """What skipped.jsonl says about an item left out as bad data."""
    return {"id": item.get("id"), **item.get("source", {}), "reason": reason}
