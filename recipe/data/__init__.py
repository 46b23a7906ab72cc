"""Data path: LLaVA JSON -> validated WebDataset shards -> dataset -> sampler -> token batches."""

from recipe.data.collate import Collator
from recipe.data.conversation import (
    IGNORE_INDEX,
    DroppedSample,
    chat_renderer,
    encode_conversation,
    encode_prompt,
    image_token_id,
    render_chatml,
    to_messages,
)
from recipe.data.dataset import ShardDataset, SkipUnreadable, UnreadableSample
from recipe.data.sampler import ResumableDistributedSampler
from recipe.data.shards import InputError, NothingKept, convert_to_shards, read_index, summary_line
from recipe.data.validate import IMAGE_TAG, Reject, check_image_tags, check_sample

__all__ = [
    "IGNORE_INDEX",
    "IMAGE_TAG",
    "Collator",
    "DroppedSample",
    "InputError",
    "NothingKept",
    "Reject",
    "ResumableDistributedSampler",
    "ShardDataset",
    "SkipUnreadable",
    "UnreadableSample",
    "chat_renderer",
    "check_image_tags",
    "check_sample",
    "convert_to_shards",
    "encode_conversation",
    "encode_prompt",
    "image_token_id",
    "read_index",
    "render_chatml",
    "summary_line",
    "to_messages",
]
