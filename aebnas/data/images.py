"""Image files decoded with Pillow into one uint8 array: any size and mode in, one stored size out.

Every image is decoded once, its EXIF orientation applied, brought to 8 bits (16-bit grayscale
scaled, not clipped; alpha dropped; palette images through RGB) and fitted to ``size`` × ``size``
pixels: the shorter side resized to ``size`` (bilinear, antialiased) and the middle kept, as
torchvision's ``Resize`` then ``CenterCrop`` would. The array has one channel while every image so
far is grayscale and becomes three (the gray ones repeated) at the first colour image, so a
grayscale folder never holds three copies of its pixels. A file Pillow cannot decode is named, not
fatal: :func:`decode_images` reports it and leaves it out.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps

from ..progress import Log, duration

GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
"""Pillow modes that hold one intensity per pixel (alpha, if any, is dropped)."""

SIZE_SAMPLE = 1000
"""Images whose headers decide the default stored size: at most this many, evenly spaced in path order."""

LARGEST_DEFAULT_SIZE = 72
"""The largest default stored size: the paper's largest searched resolution, so no pixel is kept that
a search would only shrink away (``--image-size`` keeps more)."""


def open_image(path: str | Path, draft: int | None = None) -> Image.Image:
    """The image at ``path`` decoded, upright (EXIF orientation applied), in mode L or RGB; a JPEG is
    decoded at a reduced scale when it is at least ``draft`` px on both sides anyway.

    Raises whatever Pillow raises for a file it cannot decode (OSError for a truncated file or one
    that is not an image)."""
    with Image.open(path) as im:
        if draft is not None and im.format == "JPEG":
            im.draft(im.mode, (draft, draft))
        return _eight_bit(ImageOps.exif_transpose(im))


def read_image(path: str | Path, size: int) -> np.ndarray:
    """The image at ``path`` as uint8 (size, size) if grayscale, else (size, size, 3): :func:`open_image`,
    then the shorter side resized to ``size`` and the middle kept."""
    im = open_image(path, draft=size)
    if im.size != (size, size):
        im = ImageOps.fit(im, (size, size), method=Image.Resampling.BILINEAR)
    return np.asarray(im)


def square(im: Image.Image) -> Image.Image:
    """The middle square of ``im`` (its shorter side), not resized: how a stored image is cropped."""
    side = min(im.size)
    return im if im.size == (side, side) else ImageOps.fit(im, (side, side), method=Image.Resampling.BILINEAR)


def _eight_bit(im: Image.Image) -> Image.Image:
    """``im`` in mode L (grayscale) or RGB: 16-bit and float intensities scaled into 0..255."""
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        # 16-bit PNG/TIFF: 0..65535 onto 0..255 (Pillow's convert("L") would clip everything above 255)
        pixels = np.asarray(im, dtype=np.float64).clip(0, 65535) / 257.0
        return Image.fromarray(np.rint(pixels).astype(np.uint8), "L")
    if im.mode == "F":  # float TIFF: taken as 0..255 intensities
        return Image.fromarray(np.rint(np.asarray(im).clip(0, 255)).astype(np.uint8), "L")
    if im.mode in GRAY_MODES:
        return im.convert("L")
    rgb = im.convert("RGBA").convert("RGB") if im.mode == "P" else im.convert("RGB")
    if im.mode == "P":  # a palette of grays is a grayscale image
        pixels = np.asarray(rgb)
        if (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all():
            return rgb.convert("L")
    return rgb


def shorter_side(path: str | Path) -> int | None:
    """The shorter side of the image at ``path`` in pixels (after EXIF rotation it is the same), from
    its header alone; None if Pillow cannot open it."""
    try:
        with Image.open(path) as im:
            return min(im.size)
    except Exception:  # noqa: BLE001 — an unreadable file is reported when it is decoded
        return None


def default_size(root: Path, paths: Sequence[str]) -> tuple[int, str]:
    """The stored size for ``paths`` (under ``root``) when none is given, and why, in words: the median
    shorter side of an evenly spaced sample of the files, at most :data:`LARGEST_DEFAULT_SIZE`."""
    step = max(1, len(paths) // SIZE_SAMPLE)
    sample = [s for p in paths[::step][:SIZE_SAMPLE] if (s := shorter_side(root / p)) is not None]
    if not sample:
        return LARGEST_DEFAULT_SIZE, "no image header could be read"
    median = int(np.median(sample))
    seen = f"the median shorter side of {len(sample)} images (from {min(sample)} to {max(sample)} px)"
    if median > LARGEST_DEFAULT_SIZE:
        return LARGEST_DEFAULT_SIZE, (f"{seen} is {median} px, more than the paper's largest resolution "
                                      f"{LARGEST_DEFAULT_SIZE}")
    return max(median, 1), seen


@dataclass
class Decoded:
    """What :func:`decode_images` made: ``x`` uint8 (n_ok, C, size, size) for the files that decoded,
    in the order given, ``ok`` (n,) bool per file, and ``failed`` (path, reason) for the others."""

    x: np.ndarray
    ok: np.ndarray
    failed: list[tuple[str, str]]


def decode_images(root: Path, paths: Sequence[str], size: int, log: Log, every_s: float = 10.0) -> Decoded:
    """Decode ``paths`` (relative to ``root``) into one array; a progress line every ``every_s`` seconds."""
    n = len(paths)
    x = np.empty((n, 1, size, size), dtype=np.uint8)
    ok = np.zeros(n, dtype=bool)
    failed: list[tuple[str, str]] = []
    start = last = time.perf_counter()
    for i, rel in enumerate(paths):
        try:
            pixels = read_image(root / rel, size)
        except MemoryError:
            raise
        except Exception as err:  # noqa: BLE001 — any file Pillow cannot decode is named and left out
            failed.append((rel, f"{type(err).__name__}: {err}"))
            continue
        if pixels.ndim == 3 and x.shape[1] == 1:
            x = _as_colour(x, i)
        x[i] = pixels.transpose(2, 0, 1) if pixels.ndim == 3 else pixels
        ok[i] = True
        now = time.perf_counter()
        if now - last >= every_s:
            last = now
            rate = (i + 1) / (now - start)
            log(f"aebnas: decoding {root}: {i + 1}/{n} images ({100 * (i + 1) / n:.0f}%), {rate:.0f} images/s, "
                f"{duration((n - i - 1) / rate)} left")
    return Decoded(_drop_rows(x, ok), ok, failed)


def _as_colour(x: np.ndarray, filled: int) -> np.ndarray:
    """A three-channel copy of the one-channel ``x`` whose first ``filled`` rows are decoded."""
    colour = np.empty((x.shape[0], 3, *x.shape[2:]), dtype=np.uint8)
    colour[:filled] = x[:filled]  # gray rows repeated into R, G and B
    return colour


def _drop_rows(x: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """``x`` without the rows ``keep`` marks False, compacted in place (no second copy of the images)."""
    if keep.all():
        return x
    rows = np.flatnonzero(keep)
    for j, i in enumerate(rows):
        if j != i:
            x[j] = x[i]
    return x[:len(rows)]
