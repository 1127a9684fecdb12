"""Average pooling of an image's patch grid (docs/design.md §3): the pooling baseline's tokens
(``vision_token_pooling`` before a ``linear`` / ``mlp2x_gelu`` projector) and LLaMA-VID's content tokens.

Pooling specs: ``none`` (every patch), ``mean`` (1 token), ``grid:g`` (``g x g`` tokens, adaptive average
pooling over the patch grid).
"""

from __future__ import annotations

import math

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


__all__ = ["CompressTypeError", "content_tokens_per_frame", "parse_compress_type", "pool_patches"]
