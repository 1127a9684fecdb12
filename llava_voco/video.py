"""Video frames for LLaMA-VID and VoCo video: decoded with PyAV, read from a folder of images, or, for
long videos, precomputed frame features (a ``.safetensors`` file of ``scripts/extract_video_features.py``).

Frames are taken at ``fps`` frames per second of video time (default 1, as LLaMA-VID does), and when
that gives more than ``max_frames`` they are sampled uniformly over the whole video instead. An ``fps``
above the video's own rate repeats frames rather than returning fewer: a clip always gives duration x
``fps`` frames (at most ``max_frames``). A features file was sampled when it was written: only
``max_frames`` applies to it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from .image_io import ImageReadError, check_image, load_image

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v"}
FRAME_FEATURES_SUFFIX = ".safetensors"


class VideoError(ValueError):
    """A video (file or frame folder) that yields no usable frames."""


def sample_indices(total: int, step: float, max_frames: int | None) -> list[int]:
    """The frame nearest every ``step``-th frame time, or ``max_frames`` spread uniformly over the video
    when that is fewer; in order. A ``step`` below 1 (``fps`` above the video's rate) repeats frames, as do
    ``max_frames`` above the frames there are: the count is what was asked, and frame ``i`` still stands
    for time ``i / fps`` (as fixed-count samplers such as LLaVA-NeXT-Video's ``np.linspace`` give them), where
    dropping repeats would silently shorten the clip and shift every later frame's time."""
    if total <= 0:
        return []
    wanted = np.arange(0, total, max(step, 1e-9))
    if max_frames is not None and len(wanted) > max_frames:
        indices = np.round(np.linspace(0, total - 1, max_frames))
    elif step < 1:
        indices = np.floor(wanted + 1e-6)  # the frame on screen at each sampled time: each repeated evenly
    else:
        indices = np.round(wanted)  # the frame nearest each sampled time
    return [min(int(index), total - 1) for index in indices]


def _frame_paths(folder: str | os.PathLike) -> list[Path]:
    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise VideoError(f"{folder}: the frame folder has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return paths


def read_frame_folder(folder: str | os.PathLike, max_frames: int | None = None) -> list[Image.Image]:
    paths = _frame_paths(folder)
    frames = []
    for index in sample_indices(len(paths), 1, max_frames):
        try:
            frames.append(load_image(paths[index]))
        except ImageReadError as error:
            raise VideoError(f"{error} (a frame of the video {folder})") from None
    return frames


def decode_video(path: str | os.PathLike, fps: float = 1.0, max_frames: int | None = None) -> list[Image.Image]:
    """Frames of a video file (PyAV) or a folder of frame images, at ``fps``, at most ``max_frames``."""
    if Path(path).is_dir():
        return read_frame_folder(path, max_frames)
    av = _import_av()
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            decoded = [frame.to_image() for frame in container.decode(stream)]
            rate = float(stream.average_rate or stream.guessed_rate or 0) or fps
    except (av.error.FFmpegError, IndexError, OSError) as error:
        raise VideoError(f"{path}: cannot decode video: {error}") from error
    if not decoded:
        raise VideoError(f"{path}: the video has no decodable frames")
    return [decoded[i].convert("RGB") for i in sample_indices(len(decoded), rate / fps, max_frames)]


def check_video(path: str | os.PathLike) -> None:
    """Whether a video file or frame folder opens, without decoding it (a check of a whole training set before
    the first step): a folder has frame images and its first one opens (header only); a file opens with
    PyAV and has a video stream. Raises :class:`VideoError` naming the file. Features files: ``read_frame_features``."""
    if Path(path).is_dir():
        first = _frame_paths(path)[0]
        try:
            check_image(first)
        except ImageReadError as error:
            raise VideoError(f"{error} (a frame of the video {path})") from None
        return
    av = _import_av()
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError(f"{path}: no video stream in the file")
    except (av.error.FFmpegError, OSError) as error:
        raise VideoError(f"{path}: cannot decode video: {error}") from error


def _import_av():
    try:
        import av
    except ImportError as error:
        raise ImportError("decoding video files needs PyAV: pip install 'llava-voco[video]'") from error
    return av


def count_frames(path: str | os.PathLike, fps: float = 1.0, max_frames: int | None = None) -> int:
    """The frames ``load_video`` gives for ``path``, from headers alone (no frame decoded): a folder's images, a
    features file's shape, a video file's frame count (or duration times rate), sampled as loading samples them.
    A video that cannot be read this way is a ``VideoError``."""
    try:
        if is_frame_features(path):
            from .frame_features import FrameFeatures

            total, step = len(FrameFeatures(path)), 1.0
        elif Path(path).is_dir():
            total, step = len(_frame_paths(path)), 1.0
        else:
            av = _import_av()
            try:
                with av.open(str(path)) as container:
                    stream = container.streams.video[0]
                    rate = float(stream.average_rate or stream.guessed_rate or 0) or fps
                    total = stream.frames
                    if not total and stream.duration is not None and stream.time_base is not None:
                        total = round(float(stream.duration * stream.time_base) * rate)
                    step = rate / fps
            except av.error.FFmpegError as error:
                raise OSError(error) from error
    except (ImportError, OSError, ValueError, KeyError, IndexError) as error:
        raise VideoError(f"{path}: cannot count the video's frames: {error}") from error
    return len(sample_indices(int(total), step, max_frames))


def is_frame_features(path) -> bool:
    """A video given as precomputed frame features rather than pixels."""
    return isinstance(path, (str, os.PathLike)) and str(path).lower().endswith(FRAME_FEATURES_SUFFIX)


def read_frame_features(path: str | os.PathLike, max_frames: int | None = None, width: int | None = None):
    """``[frames, patches, dim]`` from a features file, at most ``max_frames`` sampled uniformly (as for
    decoded video); only the sampled frames are read. ``width``: the vision tower's hidden size, checked
    so that features of another tower are refused here, naming the file."""
    import torch

    from .frame_features import FrameFeatures

    try:
        stored = FrameFeatures(path)
    except (OSError, ValueError, KeyError) as error:
        raise VideoError(f"{path}: cannot read frame features: {error}") from error
    frames, patches, dim = stored.shape
    if frames == 0 or patches == 0:
        raise VideoError(f"{path}: the frame features are empty (shape {stored.shape})")
    if width is not None and dim != width:
        raise VideoError(
            f"{path}: frame features of width {dim}, but the model's vision tower gives {width} "
            "(extracted with another vision tower?)"
        )
    indices = sample_indices(frames, 1, max_frames)
    if indices == list(range(indices[0], indices[-1] + 1)):
        return stored[indices[0] : indices[-1] + 1]
    return torch.cat([stored[index : index + 1] for index in indices])


def load_video(path: str | os.PathLike, fps: float = 1.0, max_frames: int | None = None, width: int | None = None):
    """A video as the processor takes it: frames (PIL images) of a file or folder, or, for a ``.safetensors``
    file, its precomputed frame features ``[frames, patches, dim]``."""
    if is_frame_features(path):
        return read_frame_features(path, max_frames, width)
    return decode_video(path, fps=fps, max_frames=max_frames)
