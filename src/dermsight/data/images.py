"""Safe, fast image decoding shared by ingest, the preprocessing cache and (later) serving.

One loader for every path an image takes means training and serving see pixels produced the same way. Every failure
a user can cause (missing file, not an image, truncated JPEG, decompression bomb, unsupported format) is raised as
`ImageError` with a one-line reason, never as a PIL traceback.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Pillow's own bomb guard warns at ~89 MP and raises at twice that. We refuse earlier and by our own rule: a real
# photo or dermoscopy image is at most a few tens of megapixels (a 48 MP phone sensor is 8000x6000).
MAX_PIXELS = 64_000_000
MAX_FILE_BYTES = 64 * 1024 * 1024
# Pillow's WebP decoder holds about 16 bytes a pixel at its peak (libwebp's buffer, a bytes copy, the image): a
# 2.5 KB lossless WebP of 8000x7999 raised a web worker's memory by 1 GB (measured), where a PNG of as many pixels
# takes 4 bytes a pixel. Half the pixels keep WebP's peak near 500 MB; phones write JPEG or HEIC at such sizes.
MAX_PIXELS_BY_FORMAT = {"WEBP": 32_000_000}
ALLOWED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "BMP", "TIFF"})

# A progressive JPEG is decoded one scan after another, and each scan costs a pass over the whole image: a 1 MB file
# of 8,000 tiny scans at 8000x8000 took 30 s of one core to decode (a 10 MB one would take minutes), under the 64 MP
# and 64 MB limits. Cameras and encoders write about 10 scans (mozjpeg's most compact setting a few more); libjpeg-
# turbo's documentation suggests a limit of this kind for untrusted input.
MAX_JPEG_SCANS = 100
_SCAN_CHUNK = 1 << 20  # bytes read at a time while counting scans

# Orientations 5-8 rotate by 90 degrees, so width and height swap once EXIF orientation is applied.
_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})


class ImageError(ValueError):
    """An image that cannot be used, with a reason fit to show a user."""


class DamagedImageError(ImageError):
    """The file says it is an image but its data cannot be decoded: corrupt, truncated (a copy or download that did
    not finish). The web app tells people to choose or take the photo again, rather than that it is too large or of
    the wrong kind."""


@dataclass(frozen=True)
class ImageInfo:
    width: int  # after EXIF orientation
    height: int
    format: str


_HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1", b"avif")


def _is_heif(data: bytes) -> bool:
    """A HEIC/HEIF or AVIF file, from its first 12 bytes."""
    return data[4:8] == b"ftyp" and data[8:12] in _HEIF_BRANDS


def describe_unsupported(data: bytes) -> str:
    """A short, friendly guess at what a file that is not a readable image is, from its first bytes: for the web
    app's 415 and for a file `_open` cannot identify."""
    if _is_heif(data):
        return "a HEIC/HEIF or AVIF photo (HEIC is the iPhone camera's default format)"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "a GIF"
    if data.startswith(b"%PDF"):
        return "a PDF document"
    if data.startswith(b"PK\x03\x04"):
        return "a ZIP or office document"
    if data[4:8] == b"ftyp":
        return "a video"
    head = data[:512]
    if head and all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return "a text file"
    return "in a format we do not recognise"


def _head(fp: io.BytesIO | Path, n: int = 512) -> bytes:
    if isinstance(fp, Path):
        try:
            with fp.open("rb") as f:
                return f.read(n)
        except OSError:
            return b""
    return fp.getvalue()[:n]


def _open(source: str | os.PathLike | bytes) -> Image.Image:
    if isinstance(source, bytes):
        if not source:
            raise ImageError("empty file (0 bytes)")
        if len(source) > MAX_FILE_BYTES:
            raise ImageError(f"file is {len(source) / 2**20:.0f} MB, over the {MAX_FILE_BYTES // 2**20} MB limit")
        fp: io.BytesIO | Path = io.BytesIO(source)
    else:
        fp = Path(source)
        try:
            size = fp.stat().st_size
        except FileNotFoundError:
            raise ImageError("file not found") from None
        except OSError as e:
            raise ImageError(f"cannot read file: {e.strerror or e}") from None
        if fp.is_dir():
            raise ImageError("is a directory, not an image file")
        if size == 0:
            raise ImageError("empty file (0 bytes)")
        if size > MAX_FILE_BYTES:
            raise ImageError(f"file is {size / 2**20:.0f} MB, over the {MAX_FILE_BYTES // 2**20} MB limit")
    try:
        with warnings.catch_warnings():
            # Pillow signals likely bombs with a warning; we check the pixel count ourselves below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(fp)
    except Image.DecompressionBombError:
        raise ImageError(
            f"the image claims to be far larger than any photo (over {MAX_PIXELS // 10**6} MP); it is not read"
        ) from None
    except UnidentifiedImageError:
        head = _head(fp)
        if _is_heif(head):  # a photo people expect to work: say what to do
            what = describe_unsupported(head)
            raise ImageError(f"this file is {what}, which cannot be read: save it as JPEG") from None
        raise DamagedImageError("not an image, or an image format that cannot be identified") from None
    except OSError as e:
        raise DamagedImageError(f"cannot read image: {e}") from None
    except (SyntaxError, ValueError) as e:
        # Pillow's own limits on what it reads while opening, e.g. a PNG text chunk that decompresses past
        # `PngImagePlugin.MAX_TEXT_CHUNK` (1 MB of metadata): the file is refused, not the whole request or dataset.
        if "MAX_TEXT_CHUNK" in str(e):
            raise DamagedImageError(
                "cannot read image: its embedded text (metadata) is larger than allowed; save the photo again "
                "without it, e.g. as a JPEG"
            ) from None
        raise DamagedImageError(f"cannot read image: {e}") from None
    if im.format not in ALLOWED_FORMATS:
        raise ImageError(f"unsupported image format {im.format}: use JPEG, PNG, WebP, BMP or TIFF")
    w, h = im.size
    limit = MAX_PIXELS_BY_FORMAT.get(im.format or "", MAX_PIXELS)
    if w * h > limit:
        of = f"the {limit // 10**6} MP limit" + (f" for {im.format} images" if limit != MAX_PIXELS else "")
        raise ImageError(f"image is {w}x{h} ({w * h / 1e6:.0f} MP), over {of}: use a smaller copy of the photo")
    if w < 1 or h < 1:
        raise ImageError(f"image has no pixels ({w}x{h})")
    return im


def _check_scans(im: Image.Image) -> None:
    """Refuse a JPEG with more than `MAX_JPEG_SCANS` scans before decoding it. A scan starts at an SOS marker
    (FF DA). The segments before the first scan (EXIF, XMP, ICC profiles, comments) are stepped over by their lengths:
    their bytes may hold FF DA anywhere. From the first scan on, every FF byte of compressed data is followed by 00, so
    each FF DA is a real marker.

    The bytes are read through Pillow's open handle, a megabyte at a time, and the handle is put back where it was:
    a file given by path is read from disk once for this and once more only as far as decoding needs."""
    fp = im.fp
    start = fp.tell()
    try:
        fp.seek(_first_scan(fp))
        scans, last = 0, b""
        while chunk := fp.read(_SCAN_CHUNK):
            # A marker split across two chunks: FF at the end of one, DA at the start of the next.
            scans += chunk.count(b"\xff\xda") + (last == b"\xff" and chunk[:1] == b"\xda")
            last = chunk[-1:]
    finally:
        fp.seek(start)
    if scans > MAX_JPEG_SCANS:
        raise ImageError(
            f"JPEG with {scans} scans (at most {MAX_JPEG_SCANS}): not a file a camera or an image editor writes"
        )


def _first_scan(fp: BinaryIO) -> int:
    """The offset of the first SOS marker, found by walking the marker segments from the start of the file (0 when
    the walk goes astray: then every FF DA of the file counts, the cautious side)."""
    fp.seek(0)
    if fp.read(2) != b"\xff\xd8":
        return 0
    while True:
        at = fp.tell()
        marker = fp.read(2)
        if len(marker) < 2 or marker[0] != 0xFF:
            return 0
        if marker[1] == 0xFF:  # fill byte before a marker
            fp.seek(at + 1)
            continue
        if marker[1] == 0xDA:
            return at
        if 0xD0 <= marker[1] <= 0xD7 or marker[1] in (0x01, 0xD8):  # markers without a length
            continue
        length = fp.read(2)
        if len(length) < 2:
            return 0
        fp.seek(at + 2 + int.from_bytes(length, "big"))


def _orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(0x0112, 1))
    except Exception:  # a malformed EXIF block must not make a good image unreadable
        return 1


def probe(source: str | os.PathLike | bytes) -> ImageInfo:
    """Read only the header: format and oriented size. Cheap; does not prove the pixel data is intact."""
    im = _open(source)
    w, h = im.size
    if _orientation(im) in _SWAPPING_ORIENTATIONS:
        w, h = h, w
    return ImageInfo(w, h, im.format or "")


def target_size(width: int, height: int, short_side: int | None) -> tuple[int, int]:
    """Size after scaling the shorter side down to ``short_side``, aspect ratio kept, never enlarging.

    Enlarging stores no new information (training and serving resize again to the model's input anyway), and
    keeping small images small keeps the cache compact.
    """
    if short_side is None or min(width, height) <= short_side:
        return width, height
    scale = short_side / min(width, height)
    if width <= height:
        return short_side, max(1, round(height * scale))
    return max(1, round(width * scale)), short_side


def kept_as_decoded(shorter: int, short_side: int | None, slack: float) -> bool:
    """Whether an image decoded with this shorter side skips the final resize: only with ``slack`` > 1, up to
    ``slack * short_side`` (see `load_rgb`; serving's arrays follow the same rule, `preprocess.decode`)."""
    return slack > 1 and short_side is not None and shorter <= short_side * slack


# Pillow's single-channel modes with more than 8 bits (16-bit PNG and TIFF, 32-bit integer and float TIFF). Its
# convert("RGB") clips them rather than scaling them, which turned a 16-bit grey photo into a white frame.
_WIDE_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def _grey_to_8bit(im: Image.Image) -> Image.Image:
    """A wide grey image as 8-bit "L", scaled by its type's range: 16-bit by 1/257 (65535 -> 255); 32-bit integers the
    same unless all fit in 8 bits (an 8-bit image stored wide); floats up to 1.0 as 0..1, others like integers.

    Pillow finds the range without a copy, and the pixels are converted a band of rows at a time: a 64 MP image
    would otherwise take several 512 MB float64 copies (a 124 KB 16-bit PNG of 8000x7999 raised a web worker's
    memory by 1.6 GB)."""
    sixteen = im.mode.startswith("I;16")
    if im.mode in ("I;16B", "I;16N"):
        # Pillow finds no extrema for big-endian (TIFF "MM") or native 16-bit: such a TIFF was refused as "corrupt".
        im = im.convert("I")
    _, top = im.getextrema()
    top = float(top) if np.isfinite(top) else 0.0
    if im.mode == "F" and top <= 1.0:
        scale = 255.0
    elif sixteen or top > 255:
        scale = 1 / 257 if top <= 65535 else 255 / top
    else:
        scale = 1.0
    w, h = im.size
    out = np.empty((h, w), np.uint8)
    for r in range(0, h, 256):
        band = np.asarray(im.crop((0, r, w, min(h, r + 256))), dtype=np.float32) * np.float32(scale)
        np.nan_to_num(band, copy=False)
        out[r : r + 256] = np.clip(band, 0, 255, out=band).round()
    return Image.fromarray(out, mode="L")


def load_rgb(
    source: str | os.PathLike | bytes,
    short_side: int | None = None,
    draft: bool = True,
    resample: Image.Resampling = Image.Resampling.BILINEAR,
    slack: float = 1.0,
) -> np.ndarray:
    """Decode an image to an RGB uint8 HxWx3 array, EXIF orientation applied, shorter side scaled to ``short_side``
    with the ``resample`` filter (antialiased; serving asks for Lanczos, see `predictor.SERVE_RESAMPLE`).

    ``slack`` > 1 lets the shorter side stay up to ``slack * short_side`` without the final resize: serving decodes
    with slack 2, where JPEG draft mode lands (it scales by powers of two), and so gets the draft decode as it is.

    With ``draft`` the JPEG decoder scales by 1/2, 1/4 or 1/8 while decoding (never below the target), which is
    several times faster than a full decode followed by a resize and, after the final antialiased resize, visually
    the same.
    """
    im = _open(source)
    try:
        if im.format in ("JPEG", "MPO"):
            _check_scans(im)
        orientation = _orientation(im)
        w, h = im.size
        if orientation in _SWAPPING_ORIENTATIONS:
            w, h = h, w
        tw, th = target_size(w, h, short_side)
        if draft and im.format in ("JPEG", "MPO") and (tw, th) != (w, h):
            # draft() works in the stored (un-rotated) frame.
            req = (th, tw) if orientation in _SWAPPING_ORIENTATIONS else (tw, th)
            im.draft("RGB", req)
        im.load()
        im = ImageOps.exif_transpose(im) if orientation != 1 else im
        if im.mode in _WIDE_GREY_MODES:
            im = _grey_to_8bit(im)
        resize = im.size != (tw, th) and not kept_as_decoded(min(im.size), short_side, slack)
        if resize and im.mode == "L":
            # Grey: scaled before it becomes three equal channels (the same pixels, a third of the memory and work).
            im, resize = im.resize((tw, th), resample, reducing_gap=None), False
        if resize and im.mode in ("RGBA", "LA"):
            # Alpha images are scaled before compositing (Pillow resizes them with premultiplied alpha, so the result is
            # the same): compositing a 48 MP RGBA PNG first took three more full-size copies, 596 MB at the peak.
            im, resize = im.resize((tw, th), resample, reducing_gap=None), False
        if im.mode != "RGB":
            # Palette/alpha images are composited on white so transparent areas do not turn black.
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                bg = Image.new("RGB", rgba.size, (255, 255, 255))
                bg.paste(rgba, mask=rgba.getchannel("A"))
                im = bg
            else:
                im = im.convert("RGB")
        if resize:
            im = im.resize((tw, th), resample, reducing_gap=None)
        # np.array copies: np.asarray of a PIL image is read-only, which torch.from_numpy warns about.
        return np.array(im, dtype=np.uint8)
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError) as e:
        # Pillow reports truncated and corrupt data as OSError ("image file is truncated", "broken data stream").
        raise DamagedImageError(f"corrupt or truncated image data: {e}") from None
    finally:
        im.close()


# The IJG (libjpeg) luminance quantisation table for quality 50, in natural order; quality q scales it by 5000/q
# (q < 50) or 200 - 2q percent. Nearly every encoder (libjpeg, Pillow, cameras' "standard" tables) uses it.
_IJG_LUMA = np.array(
    [16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
     14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
     49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99],
)  # fmt: skip


def jpeg_quality(path: str | os.PathLike) -> int:
    """The IJG quality setting a JPEG file was most likely saved with (0 when it is not a JPEG)."""
    with Image.open(path) as im:
        tables = getattr(im, "quantization", None) if im.format in ("JPEG", "MPO") else None
    if not tables or 0 not in tables or len(tables[0]) != 64:
        return 0
    luma = np.array(tables[0], dtype=np.float64)
    best, best_err = 0, float("inf")
    for q in range(1, 101):
        scale = 5000 / q if q < 50 else 200 - 2 * q
        ref = np.clip(np.floor((_IJG_LUMA * scale + 50) / 100), 1, 255)
        err = float(np.abs(ref - luma).sum())
        if err < best_err:
            best, best_err = q, err
    return best
