"""A content-addressed store of compressed images (``VoCoCache`` files), on disk or any fsspec filesystem.

The root is a folder or an fsspec URL (``file:///srv/voco``, ``s3://bucket/voco``, ``memory://voco`` ...), so
that several server processes, on one machine or several, share one store: an image one of them compressed
is a hit for all. Layout::

    ROOT/
      <key[:2]>/<key>.voco.safetensors    one compressed prompt (VoCoCache.save format)

``key = sha256(image digests, prompt text, model fingerprint)``, so the same image and prompt under
the same weights hit, and anything else misses. Writes go to a temporary file in the same directory
and are renamed into place (atomic on POSIX), so two processes writing the same key leave one valid
file; on other filesystems the file is written locally and uploaded in one put (object stores make an
object visible whole). With ``max_bytes`` set, each write evicts least recently used entries (by
modification time, which a hit refreshes on a local store; elsewhere by time of writing) until the store
fits.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tempfile
import threading
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem
from PIL import Image

from ..image_io import ImageReadError, load_image
from ..model.voco_cache import VoCoCache, VoCoCacheError, model_fingerprint

logger = logging.getLogger(__name__)
SUFFIX = ".voco.safetensors"


def image_digest(image) -> str:
    """sha256 of an image's bytes: file contents for a path or bytes, pixels + size + mode for PIL."""
    if isinstance(image, (str, os.PathLike)):
        return hashlib.sha256(Path(image).read_bytes()).hexdigest()
    if isinstance(image, bytes):
        return hashlib.sha256(image).hexdigest()
    if isinstance(image, Image.Image):
        header = f"{image.mode}:{image.size}".encode()
        return hashlib.sha256(header + image.tobytes()).hexdigest()
    raise TypeError(f"cannot digest an image of type {type(image).__name__}")


def video_digest(video) -> str:
    """sha256 of a video as the processor takes it: its frames (each digested as an image), or its
    precomputed frame features (dtype, shape and bytes)."""
    import torch

    digest = hashlib.sha256()
    if isinstance(video, torch.Tensor):
        features = video.detach().contiguous().cpu()
        digest.update(f"features:{features.dtype}:{tuple(features.shape)}".encode())
        digest.update(features.reshape(-1).view(torch.uint8).numpy())
        return digest.hexdigest()
    for frame in video:
        digest.update(image_digest(frame).encode())
    return digest.hexdigest()


def as_rgb(image) -> Image.Image:
    """A path (read with ``image_io.load_image``), encoded bytes or a PIL image, as an RGB PIL image."""
    if isinstance(image, (str, os.PathLike)):
        return load_image(image)
    if isinstance(image, bytes):
        try:
            with Image.open(io.BytesIO(image)) as opened:
                return opened.convert("RGB")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            raise ImageReadError(f"<{len(image)} bytes>: not an image PIL can read: {error}") from None
    return image.convert("RGB")


class SingleFlight:
    """Per-key locks: threads making one key wait for the first instead of repeating its work (a
    compression asked for by N concurrent requests runs once; the others then read it)."""

    def __init__(self):
        self._guard = threading.Lock()
        self._locks: dict[str, list] = {}  # key -> [lock, users]

    def __call__(self, key: str):
        return _KeyLock(self, key)


class _KeyLock:
    def __init__(self, owner: SingleFlight, key: str):
        self.owner, self.key = owner, key

    def __enter__(self):
        with self.owner._guard:
            entry = self.owner._locks.setdefault(self.key, [threading.Lock(), 0])
            entry[1] += 1
        entry[0].acquire()

    def __exit__(self, *exc):
        with self.owner._guard:
            entry = self.owner._locks[self.key]
            entry[0].release()
            entry[1] -= 1
            if entry[1] == 0:
                del self.owner._locks[self.key]


class VoCoCacheStore:
    def __init__(self, root: str | os.PathLike, max_bytes: int | None = None):
        """``root``: a folder or an fsspec URL; a local one is read and written in place, by path."""
        self.url = str(root)
        self.fs, root_path = fsspec.core.url_to_fs(self.url)
        self.is_local = isinstance(self.fs, LocalFileSystem)
        # a local root stays a Path (what callers and tests compare against), a remote one is fsspec's path
        self.root = Path(root_path) if self.is_local else root_path.rstrip("/")
        self.fs.makedirs(str(self.root), exist_ok=True)
        self.max_bytes = max_bytes
        self.single_flight = SingleFlight()

    @staticmethod
    def key(images: list, prompt: str, fingerprint: str, instructions: list[str] | None = None,
            voco_tokens: int | None = None, videos: list | None = None) -> str:
        """``instructions``: LLaMA-VID's per-image instructions, which its context tokens read; ``voco_tokens``:
        an elastic model's k; ``videos``: the prompt's videos, after its images (each absent from the key when
        not given, so the keys of image prompts and of other models are unchanged)."""
        digest = hashlib.sha256()
        for image in images:
            digest.update(image_digest(image).encode())
        for video in videos or []:
            digest.update(b"\0video\0" + video_digest(video).encode())
        digest.update(b"\0prompt\0" + prompt.encode())
        digest.update(b"\0model\0" + fingerprint.encode())
        for instruction in instructions or []:
            digest.update(b"\0instruction\0" + instruction.encode())
        if voco_tokens is not None:
            digest.update(f"\0voco_tokens\0{voco_tokens}".encode())
        return digest.hexdigest()

    def path(self, key: str) -> Path | str:
        if self.is_local:
            return self.root / key[:2] / f"{key}{SUFFIX}"
        return f"{self.root}/{key[:2]}/{key}{SUFFIX}"

    def contains(self, key: str) -> bool:
        return self.fs.exists(str(self.path(key)))

    def get(self, key: str, model) -> VoCoCache | None:
        """The stored cache, or None. A file that cannot be used (corrupt, other model) is removed."""
        path = self.path(key)
        if self.is_local and not path.exists():  # a miss, not a bad entry
            return None
        try:
            if self.is_local:
                cache = VoCoCache.load(path, model)
            else:
                with tempfile.TemporaryDirectory() as scratch:
                    local = os.path.join(scratch, os.path.basename(path))
                    self.fs.get_file(path, local)
                    cache = VoCoCache.load(local, model)
        except VoCoCacheError as error:
            logger.warning("dropping unusable cache entry: %s", error)
            self._remove(path)
            return None
        except FileNotFoundError:  # absent, or evicted by another process meanwhile
            return None
        if self.is_local:
            try:
                os.utime(path)  # most recently used
            except FileNotFoundError:
                pass
        return cache

    def put(self, key: str, cache: VoCoCache) -> Path | str:
        path = self.path(key)
        if self.is_local:
            path.parent.mkdir(parents=True, exist_ok=True)
            cache.save(path)
        else:
            with tempfile.TemporaryDirectory() as scratch:
                local = os.path.join(scratch, os.path.basename(path))
                cache.save(local)
                self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
                self.fs.put_file(local, path)  # one object write: readers see the whole file or none
        self.evict(keep=path)
        return path

    def entries(self) -> list[Path | str]:
        if self.is_local:
            return sorted(self.root.glob(f"*/*{SUFFIX}"))
        return sorted(path for path in self.fs.find(self.root) if path.endswith(SUFFIX))

    def _remove(self, path) -> None:
        try:
            self.fs.rm_file(str(path))
        except FileNotFoundError:
            pass

    def _stat(self, path) -> tuple[float, int] | None:
        """(modification time, bytes) of an entry, or None when it is gone."""
        try:
            if self.is_local:
                stat = Path(path).stat()
                return stat.st_mtime, stat.st_size
            info = self.fs.info(path)
        except FileNotFoundError:
            return None
        modified = info.get("mtime") or info.get("LastModified") or info.get("created") or 0
        if hasattr(modified, "timestamp"):
            modified = modified.timestamp()
        return float(modified), int(info.get("size") or 0)

    def size_bytes(self) -> int:
        return sum(stat[1] for stat in map(self._stat, self.entries()) if stat is not None)

    def evict(self, keep=None) -> list:
        """Remove least recently used entries until the store fits ``max_bytes``."""
        if self.max_bytes is None:
            return []
        stats = []
        for path in self.entries():
            stat = self._stat(path)
            if stat is not None:
                stats.append((stat[0], stat[1], path))
        total = sum(size for _, size, _ in stats)
        removed = []
        for _, size, path in sorted(stats, key=lambda entry: entry[0]):
            if total <= self.max_bytes:
                break
            if keep is not None and str(path) == str(keep):
                continue
            self._remove(path)
            total -= size
            removed.append(path)
        return removed

    def get_or_compress(
        self, model, processor, images: list, prompt: str, instructions: list[str] | None = None,
        videos: list | None = None,
    ) -> tuple[VoCoCache, bool]:
        """(cache, hit): the stored compression of ``prompt`` with ``images`` and ``videos`` (frames or frame
        features, after the images; and, for LLaMA-VID, each placeholder's instruction), made and stored on a
        miss. The model's fingerprint is computed once per loaded model (``model_fingerprint``)."""
        elastic_k = processor.voco_tokens if getattr(processor, "voco_token_choices", None) else None
        key = self.key(images, prompt, model_fingerprint(model), instructions, voco_tokens=elastic_k, videos=videos)
        with self.single_flight(key):  # concurrent callers for one key: one compresses, the others hit
            cache = self.get(key, model)
            if cache is not None:
                return cache, True
            cache = compress_prompt(model, processor, images, prompt, instructions, videos)
            self.put(key, cache)
            return cache, False


def compress_prompt(model, processor, images: list, prompt: str, instructions: list[str] | None = None,
                    videos: list | None = None) -> VoCoCache:
    """``model.compress`` of one prompt with its images (paths, bytes or PIL), videos and instructions."""
    extra = {"instructions": instructions} if instructions is not None else {}
    if videos:
        extra["videos"] = videos
    inputs = processor(images=[as_rgb(image) for image in images] or None, text=prompt, return_tensors="pt",
                       **extra)
    return model.compress(**inputs.to(model.device))
