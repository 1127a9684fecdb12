"""Precomputed frame features on disk: a safetensors file holding one tensor ``[frames, patches, dim]``
(``scripts/extract_video_features.py`` writes them), read a slice of frames at a time.

Torch only (no model code), so the video reader, the processor and the LLaMA-VID projector all read it
without importing each other.
"""

from __future__ import annotations

import json
import struct

import torch


class FrameFeatures:
    """Precomputed frame features in a safetensors file (one tensor ``[frames, patches, dim]``), read a
    slice of frames at a time with plain file reads (no memory map, whose pages would stay resident), so
    that hour-long videos never sit in memory whole."""

    _DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}

    def __init__(self, path, name: str | None = None):



        self.path = str(path)
        with open(self.path, "rb") as handle:
            try:
                (header_length,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(header_length))
            except (struct.error, ValueError) as error:
                raise ValueError(f"{self.path}: not a safetensors file: {error}") from error
        names = [key for key in header if key != "__metadata__"]
        if name is None and len(names) != 1:
            raise ValueError(f"{self.path}: expected one tensor [frames, patches, dim], found {names}")
        self.name = name or names[0]
        entry = header[self.name]
        self.shape = tuple(entry["shape"])
        if len(self.shape) != 3:
            raise ValueError(f"{self.path}: {self.name} has shape {self.shape}, expected [frames, patches, dim]")
        if entry["dtype"] not in self._DTYPES:
            raise ValueError(f"{self.path}: unsupported dtype {entry['dtype']}")
        self.dtype = self._DTYPES[entry["dtype"]]
        self._row_bytes = self.shape[1] * self.shape[2] * torch.empty((), dtype=self.dtype).element_size()
        self._data_start = 8 + header_length + entry["data_offsets"][0]

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> torch.Tensor:
        start, stop, step = rows.indices(len(self))
        if step != 1:
            raise ValueError("FrameFeatures reads contiguous slices of frames")
        with open(self.path, "rb") as handle:
            handle.seek(self._data_start + start * self._row_bytes)
            data = bytearray(handle.read((stop - start) * self._row_bytes))
        return torch.frombuffer(data, dtype=self.dtype).reshape(stop - start, *self.shape[1:])


__all__ = ["FrameFeatures"]
