"""What an image becomes: its features and its token count, in one place.

Every part that needs to know how many tokens an image or video frame takes in the LLM's sequence (the
processor expanding ``<image>``, the data pipeline's lengths, the ZeRO-3 blank-image row, the train
entry's log, the chat CLI) calls :func:`tokens_per_image`, with a model config or a processor. Pooling
specs (``none`` | ``mean`` | ``grid:g``) are parsed and applied here too, for both the pooled
projectors and LLaMA-VID's content tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F


class CompressTypeError(ValueError):
    """A pooling spec (``--compress_type``, ``--vision_token_pooling``) that is malformed or does not fit
    the patch grid."""


def parse_compress_type(spec: str) -> tuple[str, int]:
    """``"none"`` | ``"mean"`` | ``"grid:g"`` -> (kind, g)."""
    if spec in ("none", "mean"):
        return spec, 0
    kind, _, side = spec.partition(":")
    if kind == "grid" and side.isdigit() and int(side) > 0:
        return "grid", int(side)
    raise CompressTypeError(f"compress_type {spec!r} is malformed: use 'none', 'mean' or 'grid:<g>' with g >= 1")


def content_tokens_per_frame(spec: str, num_patches: int) -> int:
    """Tokens ``num_patches`` patch features become after pooling with ``spec``."""
    kind, side = parse_compress_type(spec)
    return {"none": num_patches, "mean": 1, "grid": side * side}[kind]


def pool_patches(patch_features: torch.Tensor, spec: str, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """``[frames, N, C]`` -> ``[frames, n, C]``: average pooling of the patch grid (``grid``: its rows and
    columns; default a square grid of ``N`` patches)."""
    kind, side = parse_compress_type(spec)
    if kind == "none":
        return patch_features
    if kind == "mean":
        return patch_features.mean(dim=1, keepdim=True)
    frames, num_patches, channels = patch_features.shape
    if grid is None:
        rows = math.isqrt(num_patches)
        if rows * rows != num_patches:
            raise CompressTypeError(f"grid pooling needs the patch grid's shape; {num_patches} patches is not a square")
        grid = (rows, rows)
    rows, columns = grid
    if rows * columns != num_patches:
        raise CompressTypeError(f"a {rows} x {columns} patch grid has {rows * columns} patches, got {num_patches}")
    if side > min(rows, columns):
        raise CompressTypeError(f"compress_type 'grid:{side}' is larger than the {rows} x {columns} patch grid")
    patch_grid = patch_features.transpose(1, 2).reshape(frames, channels, rows, columns)
    pooled = F.adaptive_avg_pool2d(patch_grid, side)  # [frames, C, side, side]
    return pooled.flatten(2).transpose(1, 2)


@dataclass(frozen=True)
class ImageTokenSpec:
    """Everything the token count of one image depends on, read from a model config or a processor."""

    patch_rows: int  # patch grid of the vision tower's input (image height // patch size)
    patch_columns: int
    extra_tokens: int  # tokens beside the patches that reach the LLM (CLS under the "full" strategy)
    projector_type: str = "mlp2x_gelu"
    vision_token_pooling: str = "none"  # linear / mlp2x_gelu
    compress_type: str = "grid:2"  # LLaMA-VID, images
    video_compress_type: str = "mean"  # LLaMA-VID, video frames
    voco_tokens: int = 0

    @property
    def patches(self) -> int:
        """Patch features per image (what LLaMA-VID and pooling read; CLS dropped under "default")."""
        return self.patch_rows * self.patch_columns + self.extra_tokens

    @classmethod
    def from_config(cls, config) -> "ImageTokenSpec":
        """From a ``VoCoLlavaConfig`` (or a plain ``LlavaConfig``: no pooling, no VoCo)."""
        vision = config.vision_config
        height, width = _pair(vision.image_size)
        patch_height, patch_width = _pair(vision.patch_size)
        return cls(
            patch_rows=height // patch_height,
            patch_columns=width // patch_width,
            extra_tokens=1 if config.vision_feature_select_strategy == "full" else 0,
            projector_type=getattr(config, "mm_projector_type", "mlp2x_gelu"),
            vision_token_pooling=getattr(config, "vision_token_pooling", "none"),
            compress_type=getattr(config, "llamavid_compress_type", "grid:2"),
            video_compress_type=getattr(config, "llamavid_video_compress_type", "mean"),
            voco_tokens=getattr(config, "voco_tokens", 0),
        )

    @classmethod
    def from_processor(cls, processor) -> "ImageTokenSpec":
        """From a ``VoCoLlavaProcessor`` (or a ``LlavaProcessor``): the image processor's output size, the
        patch size and the CLS token exactly as ``LlavaProcessor.replace_image_token`` counts them."""
        image_processor = processor.image_processor
        size = getattr(image_processor, "crop_size", None) or image_processor.size
        patch = processor.patch_size
        extra = processor.num_additional_image_tokens - (1 if processor.vision_feature_select_strategy == "default" else 0)
        llamavid = getattr(processor, "llamavid_compress_type", None)
        return cls(
            patch_rows=size["height"] // patch,
            patch_columns=size["width"] // patch,
            extra_tokens=max(extra, 0),
            projector_type="llamavid" if llamavid is not None else "mlp2x_gelu",
            vision_token_pooling=getattr(processor, "vision_token_pooling", "none"),
            compress_type=llamavid or "grid:2",
            video_compress_type=getattr(processor, "llamavid_video_compress_type", None) or llamavid or "mean",
            voco_tokens=getattr(processor, "voco_tokens", 0),
        )


@dataclass(frozen=True)
class ImageTokenCount:
    """Tokens one image or frame takes in the LLM's sequence."""

    image: int  # placeholder tokens its features replace
    voco: int  # VoCo tokens after them (0 with VoCo off)

    @property
    def total(self) -> int:
        return self.image + self.voco


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def image_token_spec(source) -> ImageTokenSpec:
    """An :class:`ImageTokenSpec` from a spec, a model config or a processor."""
    if isinstance(source, ImageTokenSpec):
        return source
    if hasattr(source, "vision_config"):
        return ImageTokenSpec.from_config(source)
    if hasattr(source, "image_processor"):
        return ImageTokenSpec.from_processor(source)
    raise TypeError(f"tokens_per_image needs a model config or a processor, got {type(source).__name__}")


def tokens_per_image(source, is_frame: bool = False) -> ImageTokenCount:
    """Tokens one image (``is_frame``: one video frame) becomes, for a model config or a processor.

    linear / mlp2x_gelu: one token per patch (plus CLS under "full"), or the pooled count with
    ``vision_token_pooling``; LLaMA-VID: 1 context token plus the pooled content tokens (frames pool with
    the video compress type); then ``voco_tokens`` VoCo tokens.
    """
    spec = image_token_spec(source)
    if spec.projector_type == "llamavid":
        image = 1 + content_tokens_per_frame(spec.video_compress_type if is_frame else spec.compress_type, spec.patches)
    elif spec.vision_token_pooling != "none":
        image = content_tokens_per_frame(spec.vision_token_pooling, spec.patches)
    else:
        image = spec.patches
    return ImageTokenCount(image=image, voco=spec.voco_tokens)


__all__ = [
    "CompressTypeError",
    "ImageTokenCount",
    "ImageTokenSpec",
    "content_tokens_per_frame",
    "image_token_spec",
    "parse_compress_type",
    "pool_patches",
    "tokens_per_image",
]
