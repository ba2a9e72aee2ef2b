"""Bytes -> RGB PIL image, for every mode a folder of real-world files contains, or a clear BadImage."""
import io
import struct
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps
from ..errors import BadImage

try:  # torchvision's decoders are deprecated since 0.29 (in favour of TorchCodec); PIL does it all when they go
    from torchvision.io import ImageReadMode, decode_jpeg
except ImportError:
    decode_jpeg = None

# Decompression bombs: PIL warns above MAX_IMAGE_PIXELS and raises above twice that; we treat the warning as an
# error as well. 2**28 px (16k x 16k) is far above any training image, and bounds a decode to ~800 MB.
Image.MAX_IMAGE_PIXELS = 2 ** 28
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_WIDE_GREY = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB.

    Transparent images are composited on black (a transparent pixel's stored colour is arbitrary, often garbage).
    16-bit and 32-bit grey (I;16, I, F) is taken as 0..65535 and scaled to 0..255; convert('L') would clip.
    """
    if img.mode == "RGB" and "transparency" not in img.info:
        return img
    if img.mode in _WIDE_GREY:
        a = np.asarray(img, dtype=np.float32) / 257.0
        img = Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode in _ALPHA_MODES or "transparency" in img.info:  # incl. palette images with a transparent index
        img = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", img.size, (0, 0, 0, 255)), img).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr


def decode_image(data: bytes, name: str = "<bytes>", draft=None) -> Image.Image:
    """Decode ``data`` to an RGB image with EXIF orientation applied (first frame of animations).

    Raises :class:`BadImage` for empty, undecodable or truncated data (we never set LOAD_TRUNCATED_IMAGES, and
    ``load()`` forces the full decode here rather than half an image later) and for decompression bombs.
    ``draft=(w, h)`` lets JPEGs decode at a reduced DCT scale that stays at least that large (fast caching).
    """
    if not data:
        raise BadImage(name, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if draft is not None and img.format == "JPEG":
                img.draft("RGB", tuple(draft))
            img.load()
        try:
            ImageOps.exif_transpose(img, in_place=True)
        except Exception:
            pass  # a broken EXIF block does not make the pixels bad
        return to_rgb(img)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ... on bad data
        raise BadImage(name, f"cannot decode ({type(e).__name__}: {e})".replace("\n", " ")) from None


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 (3, H, W)."""
    w, h = img.size
    return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(h, w, 3).permute(2, 0, 1)


def decode_tensor(data: bytes, name: str = "<bytes>") -> torch.Tensor:
    """Like :func:`decode_image` but to a uint8 (3, H, W) tensor. JPEGs go through torchvision's decoder (same
    libjpeg-turbo, same pixels, EXIF orientation applied, truncation raises), which skips PIL's per-file overhead:
    about 3x faster on CIFAR-sized images. Anything it does not take falls back to PIL for a verdict."""
    hw = _jpeg_size(data) if decode_jpeg is not None and data[:2] == b"\xff\xd8" else None
    if hw and hw[0] * hw[1] <= Image.MAX_IMAGE_PIXELS:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB,
                                   apply_exif_orientation=True)
        except RuntimeError:
            pass
    return pil_to_tensor(decode_image(data, name))


def _jpeg_size(data: bytes):
    """(height, width) from a JPEG's frame header (to bound the decode before it starts), or None."""
    i = 2
    while i + 9 <= len(data) and data[i] == 0xFF:
        m = data[i + 1]
        if 0xC0 <= m <= 0xCF and m not in (0xC4, 0xC8, 0xCC):  # SOFn; C4/C8/CC are other markers
            return struct.unpack(">HH", data[i + 5:i + 9])
        i += 2 + struct.unpack(">H", data[i + 2:i + 4])[0]
    return None


def read_bytes(source, i: int) -> bytes:
    """``source.read_bytes(i)``, with unreadable files (broken links, permissions) as BadImage."""
    try:
        return source.read_bytes(i)
    except OSError as e:
        raise BadImage(source.names[i], f"cannot read ({e})") from None


def load_image(source, i: int, draft=None) -> Image.Image:
    """Read and decode image ``i`` of a source."""
    return decode_image(read_bytes(source, i), source.names[i], draft)
