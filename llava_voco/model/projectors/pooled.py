"""Average pooling of an image's patch grid (docs/design.md §3): the pooling baseline's tokens
(``vision_token_pooling`` before a ``linear`` / ``mlp2x_gelu`` projector) and LLaMA-VID's content tokens.

Pooling specs: ``none`` (every patch), ``mean`` (1 token), ``grid:g`` (average pooling over the patch grid).
``grid:g`` pools one of two ways (``GRID_POOLINGS``): ``adaptive`` gives exactly ``g x g`` tokens (the
pooling baseline's); ``avg_pool`` is LLaMA-VID's ``F.avg_pool2d`` with kernel and stride ``side // g``, so a
side ``g`` does not divide gives more (``grid:4`` on a 6 x 6 grid: kernel 1, 36 tokens).
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


# How ``grid:g`` pools (see the module docstring); ``avg_pool`` is LLaMA-VID's, ``adaptive`` the baseline's.
GRID_POOLINGS = ("avg_pool", "adaptive")


def check_grid_pooling(grid_pooling: str) -> str:
    if grid_pooling not in GRID_POOLINGS:
        raise CompressTypeError(f"grid pooling {grid_pooling!r}: use one of {', '.join(GRID_POOLINGS)}")
    return grid_pooling


def _patch_grid(num_patches: int, grid: tuple[int, int] | None) -> tuple[int, int]:
    if grid is None:
        rows = math.isqrt(num_patches)
        if rows * rows != num_patches:
            raise CompressTypeError(f"grid pooling needs the patch grid's shape; {num_patches} patches is not a square")
        grid = (rows, rows)
    rows, columns = grid
    if rows * columns != num_patches:
        raise CompressTypeError(f"a {rows} x {columns} patch grid has {rows * columns} patches, got {num_patches}")
    return rows, columns


def pooled_grid(grid: tuple[int, int], side: int, grid_pooling: str = "adaptive") -> tuple[int, int]:
    """(rows, columns) of ``grid:side`` pooling of a ``grid`` of patches."""
    rows, columns = grid
    if side > min(rows, columns):
        raise CompressTypeError(f"compress_type 'grid:{side}' is larger than the {rows} x {columns} patch grid")
    if check_grid_pooling(grid_pooling) == "adaptive":
        return side, side
    return rows // (rows // side), columns // (columns // side)  # kernel = stride = side // g, no padding


def content_tokens_per_frame(spec: str, num_patches: int, grid: tuple[int, int] | None = None,
                             grid_pooling: str = "adaptive") -> int:
    """Tokens ``num_patches`` patch features (``grid``: their rows and columns; default a square) become
    after pooling with ``spec``."""
    kind, side = parse_compress_type(spec)
    if kind == "grid":
        rows, columns = pooled_grid(_patch_grid(num_patches, grid), side, grid_pooling)
        return rows * columns
    return {"none": num_patches, "mean": 1}[kind]


def pool_patches(patch_features: torch.Tensor, spec: str, grid: tuple[int, int] | None = None,
                 grid_pooling: str = "adaptive") -> torch.Tensor:
    """``[frames, N, C]`` -> ``[frames, n, C]``: average pooling of the patch grid (``grid``: its rows and
    columns; default a square grid of ``N`` patches), row-major."""
    kind, side = parse_compress_type(spec)
    if kind == "none":
        return patch_features
    if kind == "mean":
        return patch_features.mean(dim=1, keepdim=True)
    frames, num_patches, channels = patch_features.shape
    rows, columns = _patch_grid(num_patches, grid)
    pooled_grid((rows, columns), side, grid_pooling)  # refuses a side larger than the grid
    patch_grid = patch_features.transpose(1, 2).reshape(frames, channels, rows, columns)
    if grid_pooling == "adaptive":
        pooled = F.adaptive_avg_pool2d(patch_grid, side)  # [frames, C, side, side]
    else:
        kernel = (rows // side, columns // side)
        pooled = F.avg_pool2d(patch_grid, kernel_size=kernel, stride=kernel)  # [frames, C, rows // k, columns // k]
    return pooled.flatten(2).transpose(1, 2)


__all__ = ["GRID_POOLINGS", "CompressTypeError", "check_grid_pooling", "content_tokens_per_frame", "parse_compress_type",
           "pool_patches", "pooled_grid"]
