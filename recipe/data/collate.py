"""Dataset items -> a padded training batch.

Batch dict:
  input_ids       (B, T) long, right-padded with tokenizer.pad_token_id
  attention_mask  (B, T) long, 1 on real tokens
  labels          (B, T) long, -100 on padding and on everything but answers (not shifted)
  pixel_values    (N_img, 3, H, W) float32: the images of the rows with has_image, in row order;
                  (0, 3, H, W) when no row has an image
  teacher_pixel_values  the same images through the teacher's image processor, only when the collator
                  has one (a teacher that preprocesses differently from the student: docs/method.md's image_T)
  has_image       (B,) bool
  ids             list of B sample ids
  dropped         {reason: count} of items left out of this batch (see conversation.DroppedSample)

Items that cannot be encoded (too long) are dropped from the batch, not replaced, so B can be
smaller than the number of items - and 0 when all are dropped (input_ids of shape (0, 0)). The
caller skips such a batch (in distributed training: every rank must still take part in the step,
e.g. with a zero-weight loss) and adds `dropped` to its counters. Counting happens per batch
because the collator runs inside DataLoader worker processes, whose state the trainer never sees.
"""

import torch
from PIL import Image

from recipe.data.conversation import IGNORE_INDEX, DroppedSample, encode_conversation
from recipe.data.validate import Reject, check_image_tags


class Collator:
    def __init__(
        self,
        tokenizer,
        image_processor,
        *,
        num_image_tokens: int,
        image_token_id: int,
        max_length: int,
        template: str = "auto",
        pad_to_multiple_of: int | None = None,
        teacher_image_processor=None,
    ):
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token first")
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.num_image_tokens, self.image_token_id = num_image_tokens, image_token_id
        self.image_token = tokenizer.convert_ids_to_tokens(image_token_id)
        self.max_length, self.template, self.pad_to_multiple_of = max_length, template, pad_to_multiple_of
        self.teacher_image_processor = teacher_image_processor
        self._image_shapes = {}  # processor id -> (3, H, W) it produces, for empty pixel_values

    def __call__(self, items: list[dict]) -> dict:
        rows, images, dropped = [], [], {}
        for item in items:
            with_image = item.get("image") is not None
            try:
                check_image_tags(item["conversations"], with_image=with_image, image_tag=self.image_token)
            except Reject as error:
                raise ValueError(f"sample {item.get('id')!r}: {error}") from None
            try:
                encoded = encode_conversation(
                    item["conversations"],
                    self.tokenizer,
                    image_token=self.image_token,
                    num_image_tokens=self.num_image_tokens,
                    max_length=self.max_length,
                    template=self.template,
                )
            except DroppedSample as drop:
                dropped[drop.reason] = dropped.get(drop.reason, 0) + 1
                continue
            rows.append((item.get("id"), encoded, with_image))
            if with_image:
                images.append(item["image"])

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
            "pixel_values": self._pixel_values(self.image_processor, images),
            "has_image": torch.tensor([with_image for _, _, with_image in rows], dtype=torch.bool),
            "ids": [sample_id for sample_id, _, _ in rows],
            "dropped": dropped,
        }
        if self.teacher_image_processor is not None:
            batch["teacher_pixel_values"] = self._pixel_values(self.teacher_image_processor, images)
        return batch

    def _pixel_values(self, processor, images: list) -> torch.Tensor:
        if images:
            return processor(images=images, return_tensors="pt")["pixel_values"].to(torch.float32)
        if id(processor) not in self._image_shapes:  # ask the processor once what it makes of an image
            probe = processor(images=[Image.new("RGB", (8, 8))], return_tensors="pt")["pixel_values"]
            self._image_shapes[id(processor)] = tuple(probe.shape[1:])
        return torch.zeros((0, *self._image_shapes[id(processor)]), dtype=torch.float32)
