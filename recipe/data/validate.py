"""Checks one LLaVA-format sample before it goes into a shard.

A failed check raises `Reject(reason)`. Reasons are short, stable codes (they end up in
rejects.jsonl and in the index stats, so scripts can count them):

  not_an_object       the record is not a JSON object
  missing_id          no "id" (or it is not a string / integer)
  bad_conversations   "conversations" missing, not a list, or empty
  bad_turn            a turn that is not {"from": str, "value": str, ...}
  bad_roles           roles are not human/gpt alternating, starting with human and ending with gpt
  empty_turn          a turn whose value is empty or whitespace only
  image_tag_count     image sample: not exactly one <image>, in the first human turn;
                      text-only sample: any <image> at all
  bad_image_field     "image" is not a non-empty string (multi-image samples are not supported)
  missing_image       the image file does not exist
  empty_image         the image file has zero bytes, or decodes to zero pixels
  undecodable_image   PIL cannot decode the file (truncated, corrupt, not an image)
"""

import os

from PIL import Image

from recipe.data.images import decode_rgb

IMAGE_TAG = "<image>"
ROLES = ("human", "gpt")


class Reject(ValueError):
    """A sample that must not go into a shard; `reason` is one of the codes above."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def has_image(sample: dict) -> bool:
    # "image": null is treated like a missing key: a text-only sample.
    return sample.get("image") is not None


def check_sample(sample) -> None:
    """Everything about a sample except its image file. Raises Reject."""
    if not isinstance(sample, dict):
        raise Reject("not_an_object", type(sample).__name__)
    if not isinstance(sample.get("id"), (str, int)) or isinstance(sample.get("id"), bool):
        raise Reject("missing_id")
    if has_image(sample) and not (isinstance(sample["image"], str) and sample["image"].strip()):
        raise Reject("bad_image_field", repr(sample["image"])[:80])
    check_conversation(sample.get("conversations"), with_image=has_image(sample))


def check_conversation(turns, *, with_image: bool) -> None:
    if not isinstance(turns, list) or not turns:
        raise Reject("bad_conversations")
    for turn in turns:
        if not (isinstance(turn, dict) and isinstance(turn.get("from"), str) and isinstance(turn.get("value"), str)):
            raise Reject("bad_turn")
    roles = [turn["from"] for turn in turns]
    expected = [ROLES[i % 2] for i in range(len(turns))]
    if roles != expected or len(turns) % 2:
        raise Reject("bad_roles", "/".join(roles)[:80])
    if any(not turn["value"].strip() for turn in turns):
        raise Reject("empty_turn")
    check_image_tags(turns, with_image=with_image)


def check_image_tags(turns: list[dict], *, with_image: bool, image_tag: str = IMAGE_TAG) -> None:
    """An image sample has exactly one image tag, in its first turn; a text-only sample has none.
    The one check of the tags, for conversion, training and evaluation alike. Raises Reject."""
    tags_first = turns[0]["value"].count(image_tag)
    tags_later = sum(turn["value"].count(image_tag) for turn in turns[1:])
    if tags_later or tags_first != (1 if with_image else 0):
        raise Reject("image_tag_count", f"{'an image' if with_image else 'no image'}, {image_tag} tags: "
                                        f"first turn {tags_first}, later turns {tags_later}")


def read_image_file(path: str) -> tuple[bytes, Image.Image]:
    """Read and fully decode an image file. Returns (original bytes, RGB image); raises Reject."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise Reject("missing_image", path) from None
    except IsADirectoryError:
        raise Reject("missing_image", f"{path} is a directory") from None
    if not data:
        raise Reject("empty_image", path)
    try:
        image = decode_rgb(data)
    except Exception as error:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBomb...)
        raise Reject("undecodable_image", f"{os.path.basename(path)}: {error}") from None
    if image.width == 0 or image.height == 0:
        raise Reject("empty_image", path)
    return data, image
