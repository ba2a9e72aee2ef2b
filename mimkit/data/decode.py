"""Bytes -> RGB PIL image, for every mode a folder of real-world files contains, or a clear BadImage; and
bytes -> an (H, W, C) array at full precision (:func:`decode_array`) for 16-bit, multi-band and array files."""
import io
import struct
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps
from ..errors import BadImage

try:  # torchvision's decoders are deprecated since 0.29 (in favour of TorchCodec); PIL does it all when they go
    from torchvision.io import ImageReadMode, decode_jpeg, decode_png
except ImportError:
    decode_jpeg = decode_png = None

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
    return to_rgb(_decode_pil(data, name, draft))


def _decode_pil(data: bytes, name: str, draft=None) -> Image.Image:
    """The PIL image as stored (any mode), EXIF orientation applied, fully decoded; or BadImage."""
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
        return img
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


# full precision, any channel count ----------------------------------------------------------------------------
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF, both byte orders
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def decode_array(data: bytes, name: str = "<bytes>", finite: bool = True) -> np.ndarray:
    """Decode ``data`` to an (H, W, C) array of the file's own dtype, nothing rescaled or dropped.

    TIFF (tifffile): every band of the first series, samples or planes as channels; a multi-page file whose
    pages are single 2-D planes of one size is one image with a channel per page. ``.npy`` / ``.npz`` (one
    array): (H, W) or (H, W, C), any numeric dtype, NaN/inf refused. 16-bit PNG: torchvision's decoder (PIL
    reads 16-bit RGB as 8-bit). Everything else through :func:`decode_image`'s rules, except that a grey image
    stays one channel (L, or 16/32-bit I;16 / I / F at full precision). Alpha is composited on black, as there.
    ``finite=False`` leaves the NaN/inf check to the caller.
    """
    if not data:
        raise BadImage(name, "empty file (0 bytes)")
    try:
        if data[:4] in _TIFF_MAGIC:
            arr = _tiff(data)
        elif data[:6] == b"\x93NUMPY" or data[:4] == b"PK\x03\x04":
            arr = _numpy(data)
        elif data[:8] == _PNG_MAGIC and len(data) > 26 and data[24] == 16:  # IHDR bit depth 16
            arr = _png16(data)
        else:
            arr = None
    except BadImage:
        raise
    except Exception as e:
        raise BadImage(name, f"cannot decode ({type(e).__name__}: {e})".replace("\n", " ")) from None
    if arr is None:
        arr = _pil_array(data, name)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or min(arr.shape) == 0:
        raise BadImage(name, f"expected an (H, W) or (H, W, C) image, got shape {arr.shape}")
    if arr.dtype.kind not in "uif":
        raise BadImage(name, f"dtype {arr.dtype} is not numeric")
    if finite:
        check_finite(arr, name)
    return arr


def check_finite(arr: np.ndarray, name: str):
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise BadImage(name, f"holds {int((~np.isfinite(arr)).sum())} NaN or infinite values")


def _tiff(data: bytes) -> np.ndarray:
    import tifffile
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        series = tif.series
        planes = [s for s in series if len(s.shape) == 2]
        if len(series) > 1 and len(planes) == len(series) and len({s.shape for s in series}) == 1:
            return np.stack([s.asarray() for s in series], -1)  # pages written one by one: a band each
        s = series[0]
        arr, axes = s.asarray(), s.axes
    if "Y" not in axes or "X" not in axes:
        raise ValueError(f"TIFF axes {axes} have no Y and X")
    others = [i for i, a in enumerate(axes) if a not in "YX"]
    arr = np.moveaxis(arr, [axes.index("Y"), axes.index("X")], [0, 1])
    return arr.reshape(arr.shape[0], arr.shape[1], -1) if others else arr


def tiff_band_names(data: bytes):
    """The band descriptions a GeoTIFF carries (GDAL's metadata tag, as rasterio and GDAL write them: an
    ``Item name="DESCRIPTION" sample="i"`` per band), in band order; None when the file is no TIFF or names not
    every band."""
    if data[:4] not in _TIFF_MAGIC:
        return None
    import tifffile
    import xml.etree.ElementTree as ET
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            text = tif.gdal_metadata
        if not text:
            return None
        items = ET.fromstring(text).iter("Item")
        names = {int(i.get("sample")): (i.text or "").strip() for i in items
                 if i.get("name") == "DESCRIPTION" and i.get("sample") is not None}
    except Exception:  # damaged metadata names nothing; the pixels are judged by decode_array
        return None
    if not names or sorted(names) != list(range(len(names))) or not all(names.values()):
        return None
    return tuple(names[i] for i in range(len(names)))


def _numpy(data: bytes) -> np.ndarray:
    loaded = np.load(io.BytesIO(data), allow_pickle=False)  # a pickled object array is refused, never run
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            if len(loaded.files) != 1:
                raise ValueError(f".npz holds {len(loaded.files)} arrays ({', '.join(loaded.files[:4])}); "
                                 f"expected one (H, W, C) array")
            loaded = loaded[loaded.files[0]]
    return np.asarray(loaded)


def _png16(data: bytes) -> np.ndarray:
    if decode_png is None:
        raise ValueError("16-bit PNG needs torchvision's PNG decoder")
    x = decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.UNCHANGED)
    arr = x.permute(1, 2, 0).numpy().astype(np.uint16)  # torch's uint16 has few ops; numpy's has all
    if arr.shape[2] in (2, 4):  # grey + alpha, RGBA: composite on black, as for 8-bit
        a = arr[:, :, -1:].astype(np.float64) / 65535
        arr = np.rint(arr[:, :, :-1] * a).astype(np.uint16)
    return arr


def _pil_array(data: bytes, name: str) -> np.ndarray:
    img = _decode_pil(data, name)
    if img.mode in _WIDE_GREY:
        dtype = {"I": np.int32, "F": np.float32}.get(img.mode, np.uint16)
        return np.asarray(img, dtype=dtype)
    if img.mode in ("L", "1", "LA", "La"):  # grey stays one channel (alpha composited on black: exact for grey)
        return np.asarray(to_rgb(img).convert("L") if img.mode in ("LA", "La") or "transparency" in img.info
                          else img.convert("L"))
    return np.asarray(to_rgb(img))


# segmentation masks ---------------------------------------------------------------------------------------------
def decode_mask(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decode a segmentation mask to an (H, W) integer array of class ids, exactly as stored.

    Grey PNGs (8 or 16-bit) and palette PNGs give their stored values (a palette image's indices, never its
    colours); TIFF and ``.npy`` / ``.npz`` give their one band. Each file's own EXIF orientation is applied, as for
    images (a mask stored without one is used as stored). An RGB(A) mask that is not a palette image, a mask of
    several bands and a float mask with fractional values are BadImage: they hold colours or scores, not ids."""
    if not data:
        raise BadImage(name, "empty file (0 bytes)")
    if data[:4] in _TIFF_MAGIC or data[:6] == b"\x93NUMPY" or data[:4] == b"PK\x03\x04" or (
            data[:8] == _PNG_MAGIC and len(data) > 26 and data[24] == 16):
        arr = decode_array(data, name)
    else:
        img = _decode_pil(data, name)
        if img.mode not in ("P", "L", "1", "I", "I;16", "I;16L", "I;16B", "I;16N"):
            raise BadImage(name, f"is a {img.mode} image, not a mask of class ids: save masks as single-channel "
                                 f"(grey) or palette PNGs whose values are the class ids")
        arr = np.asarray(img)  # palette images: the indices
    if arr.ndim == 3:
        if arr.shape[2] != 1:
            raise BadImage(name, f"has {arr.shape[2]} channels; a mask has one (class ids), RGB colour masks are "
                                 f"not read: save the ids as a grey or palette PNG")
        arr = arr[:, :, 0]
    if arr.dtype.kind == "f":
        if not np.array_equal(arr, np.round(arr)):
            raise BadImage(name, "holds fractional values; a mask holds integer class ids")
        arr = arr.astype(np.int64)
    if arr.dtype.kind not in "uib":
        raise BadImage(name, f"dtype {arr.dtype} is not an integer mask")
    return arr.astype(np.int64)
