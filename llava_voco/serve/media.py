"""Images and videos in a chat request, read under the server's policy.

An ``image_url`` is a ``data:`` URL (base64), an ``http(s)`` URL (only with ``--allow-remote-images``) or a
local path / ``file://`` URL (only under ``--image-root``). Every read is bounded: encoded bytes
(``max_media_bytes``), decoded pixels per image (``max_pixels``, checked from the header before decoding)
and frames per video. A video is a ``video_url`` part (a video data URL, decoded with PyAV) or a ``video``
part listing its frames as image URLs. Every refusal is a :class:`MediaError` naming the part and the
problem, which the server answers with a 400.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^,;]*)*?);base64,(?P<data>.*)$", re.S)
_VIDEO_SUFFIXES = {"video/mp4": ".mp4", "video/webm": ".webm", "video/quicktime": ".mov", "video/x-matroska": ".mkv",
                   "video/avi": ".avi", "video/x-msvideo": ".avi"}


class MediaError(ValueError):
    """A media part the server will not read; the message names it and says why."""


@dataclass
class MediaPolicy:
    allow_remote: bool = False
    image_root: str | None = None
    max_media_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 4096 * 4096
    max_frames: int = 16
    video_fps: float = 1.0
    remote_timeout_s: float = 10.0

    def read_bytes(self, url: str, what: str) -> bytes:
        """The bytes behind ``url`` (data, http(s) or a local path), within the policy."""
        if not isinstance(url, str) or not url:
            raise MediaError(f"{what}: no url")
        if url.startswith("data:"):
            return self._data_url(url, what)[1]
        if url.startswith(("http://", "https://")):
            if not self.allow_remote:
                raise MediaError(f"{what}: remote URLs are not read by this server (start it with --allow-remote-images)")
            return self._remote(url, what)
        return self._local(url, what)

    def _data_url(self, url: str, what: str) -> tuple[str, bytes]:
        match = _DATA_URL.match(url)
        if match is None:
            raise MediaError(f"{what}: not a base64 data URL (data:<type>;base64,<data>)")
        encoded = match.group("data")
        if len(encoded) * 3 // 4 > self.max_media_bytes:
            raise MediaError(f"{what}: {len(encoded) * 3 // 4} bytes, more than the limit of {self.max_media_bytes}")
        try:
            data = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError) as error:
            raise MediaError(f"{what}: corrupt base64 ({error})") from None
        return match.group("mime") or "", data

    def _remote(self, url: str, what: str) -> bytes:
        import httpx

        try:
            with httpx.stream("GET", url, timeout=self.remote_timeout_s, follow_redirects=True) as response:
                response.raise_for_status()
                chunks, total = [], 0
                for chunk in response.iter_bytes():
                    total += len(chunk)
                    if total > self.max_media_bytes:
                        raise MediaError(f"{what}: more than the limit of {self.max_media_bytes} bytes")
                    chunks.append(chunk)
        except httpx.HTTPError as error:
            raise MediaError(f"{what}: cannot fetch {url}: {error}") from None
        return b"".join(chunks)

    def _local(self, url: str, what: str) -> bytes:
        if self.image_root is None:
            raise MediaError(f"{what}: local paths are not read by this server (start it with --image-root DIR)")
        path = url[len("file://"):] if url.startswith("file://") else url
        root = Path(self.image_root).resolve()
        resolved = (root / path).resolve()  # an absolute path stays itself
        if not resolved.is_relative_to(root):
            raise MediaError(f"{what}: {path} is outside --image-root")
        try:
            if resolved.stat().st_size > self.max_media_bytes:
                raise MediaError(f"{what}: {path} is larger than the limit of {self.max_media_bytes} bytes")
            return resolved.read_bytes()
        except OSError as error:
            raise MediaError(f"{what}: cannot read {path}: {error.strerror or error}") from None

    def image(self, data: bytes, what: str) -> Image.Image:
        """Decode an image after checking its size from the header."""
        try:
            with Image.open(io.BytesIO(data)) as opened:
                width, height = opened.size
                if width * height > self.max_pixels:
                    raise MediaError(f"{what}: {width}x{height} pixels, more than the limit of {self.max_pixels}")
                return opened.convert("RGB")
        except MediaError:
            raise
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            raise MediaError(f"{what}: not an image ({error})") from None

    def read_image(self, url: str, what: str) -> bytes:
        """The image's encoded bytes, checked to decode within the pixel limit (the store keys them)."""
        data = self.read_bytes(url, what)
        self.image(data, what)
        return data

    def read_frames(self, urls: list, what: str) -> list[Image.Image]:
        if not isinstance(urls, list) or not urls:
            raise MediaError(f"{what}: a video part lists its frames as image URLs")
        if len(urls) > self.max_frames:
            raise MediaError(f"{what}: {len(urls)} frames, more than the limit of {self.max_frames}")
        frames = []
        for index, url in enumerate(urls):
            url = url.get("url") if isinstance(url, dict) else url
            frames.append(self.image(self.read_bytes(url, f"{what} frame {index}"), f"{what} frame {index}"))
        return frames

    def read_video(self, url: str, what: str) -> list[Image.Image]:
        """A video file (data URL, remote or local) decoded with PyAV at ``video_fps``, at most ``max_frames``."""
        from ..video import VideoError, decode_video

        if url.startswith("data:"):
            mime, data = self._data_url(url, what)
        else:
            mime, data = "", self.read_bytes(url, what)
        suffix = _VIDEO_SUFFIXES.get(mime, Path(url).suffix if not url.startswith("data:") else ".mp4") or ".mp4"
        with tempfile.TemporaryDirectory() as scratch:
            path = os.path.join(scratch, "video" + suffix)
            Path(path).write_bytes(data)
            try:
                frames = decode_video(path, fps=self.video_fps, max_frames=self.max_frames)
            except (VideoError, OSError, ValueError) as error:
                raise MediaError(f"{what}: not a video PyAV can decode ({str(error).replace(path, '<video>')})") from None
        if not frames:
            raise MediaError(f"{what}: the video has no frames")
        for index, frame in enumerate(frames):
            if frame.width * frame.height > self.max_pixels:
                raise MediaError(f"{what}: frame {index} is {frame.width}x{frame.height}, more than {self.max_pixels} pixels")
        return frames


__all__ = ["MediaError", "MediaPolicy"]
