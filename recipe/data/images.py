"""Image bytes <-> RGB PIL images, shared by the shard writer (validation) and the reader.

The writer and the reader decode with the same function, so an image that passed validation
decodes the same way at training time.
"""

import io

import numpy as np
from PIL import Image

# PIL format name -> member extension in the shard (no dots: the tar key/extension split relies on it).
_EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff"}


def decode_rgb(data: bytes) -> Image.Image:
    """Decode image bytes fully and return an RGB image (grayscale, palette, RGBA, CMYK... -> RGB).

    Same conversion as LLaVA's `Image.open(f).convert("RGB")`: alpha is dropped, no EXIF rotation; except
    that 16-bit grayscale is scaled to 8 bits (PIL's convert clips it at 255: a white image).
    Raises OSError/ValueError (whatever PIL raises) on truncated or corrupt data, ValueError on float images.
    """
    with Image.open(io.BytesIO(data)) as image:
        image.load()  # decode now: a truncated file fails here, not later in a DataLoader worker
        if image.mode == "F":
            raise ValueError("32-bit float image: no defined 8-bit range to convert it to")
        if image.mode == "I" or image.mode.startswith("I;16"):
            eight_bit = (np.asarray(image, dtype=np.float64) / 257).round().clip(0, 255).astype(np.uint8)
            return Image.fromarray(eight_bit, "L").convert("RGB")
        return image.convert("RGB")


def image_extension(data: bytes) -> str:
    """Shard member extension for these image bytes, from the decoded format (not the file name)."""
    with Image.open(io.BytesIO(data)) as image:
        fmt = image.format or "PNG"
    return _EXTENSIONS.get(fmt, fmt.lower().replace(".", ""))


def shrink_to_max_side(image: Image.Image, max_side: int) -> Image.Image | None:
    """Downscaled copy whose longer side is max_side, or None when the image already fits."""
    width, height = image.size
    if max(width, height) <= max_side:
        return None
    scale = max_side / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def reencode(image: Image.Image, original_ext: str) -> tuple[bytes, str]:
    """Encode an RGB image after resizing: JPEG stays JPEG (quality 95), anything else becomes PNG."""
    buffer = io.BytesIO()
    if original_ext == "jpg":
        image.save(buffer, format="JPEG", quality=95)
        return buffer.getvalue(), "jpg"
    image.save(buffer, format="PNG")
    return buffer.getvalue(), "png"
