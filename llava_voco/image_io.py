"""Reading images from files, and LLaVA's pad-to-square: the one place for both.

Training data, the chat CLI, the eval entry, the cache store and frame folders all read images here,
so a missing, corrupt or oversized file gets the same one-line :class:`ImageReadError` everywhere.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from PIL import Image, UnidentifiedImageError


class ImageReadError(ValueError):
    """An image file that cannot be used; the message names the file and the problem."""


def load_image(path: str | os.PathLike) -> Image.Image:
    """The image at ``path`` as RGB; raises :class:`ImageReadError` naming the file for a missing, empty,
    unreadable (corrupt, not an image) or oversized file (PIL's decompression-bomb limit)."""
    with _opened(path) as opened:
        return opened.convert("RGB")


def check_image(path: str | os.PathLike) -> None:
    """Whether the file at ``path`` opens as an image, from its header only (no pixels decoded: fast enough to
    run over a whole training set before the first step); raises :class:`ImageReadError` as ``load_image``
    does. A file whose pixels are corrupt past a valid header passes here and fails when loaded."""
    with _opened(path):
        pass


@contextmanager
def _opened(path: str | os.PathLike) -> Iterator[Image.Image]:
    """``Image.open`` (the header read, pixels not yet), with every way it fails as one ImageReadError."""
    if not os.path.exists(path):
        raise ImageReadError(f"{path}: no such image file")
    if os.path.isdir(path):
        raise ImageReadError(f"{path}: is a folder, not an image file")
    if os.path.getsize(path) == 0:
        raise ImageReadError(f"{path}: empty file (0 bytes), not an image")
    try:
        with Image.open(path) as opened:
            yield opened
    except Image.DecompressionBombError as error:
        raise ImageReadError(f"{path}: image too large ({error})") from None
    except UnidentifiedImageError:
        raise ImageReadError(f"{path}: not an image file PIL can read (corrupt, or another kind of file)") from None
    except (OSError, ValueError, SyntaxError) as error:
        raise ImageReadError(f"{path}: unreadable image file: {error}") from None


def expand_to_square(image: Image.Image, background: tuple[int, ...]) -> Image.Image:
    """Centre ``image`` on a square canvas of ``background`` colour (LLaVA's ``--image_aspect_ratio pad``), so
    that the image processor's centre crop keeps the whole image."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def pad_to_square(image: Image.Image, image_processor) -> Image.Image:
    """``expand_to_square`` with the image processor's mean colour as background, as LLaVA pads."""
    mean = image_processor.image_mean
    return expand_to_square(image, tuple(int(channel * 255) for channel in mean))


__all__ = ["ImageReadError", "check_image", "expand_to_square", "load_image", "pad_to_square"]
