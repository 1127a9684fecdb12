"""Padding-free packing (docs/design.md §2.6): several samples one after another in a row.

Samples keep their order (so the batch's images stay in token order) and are never split, so no image
block is cut; each row holds at most ``max_length`` tokens. Position ids restart at 0 for each sample: that
is how the model tells packed samples apart (``voco_mask.packed_sample_index``), applying the VoCo rule
within each sample and letting no token read another sample. The first label of each sample is ignored, so
no label is predicted across a sample boundary; the loss (a mean over label tokens) is then the unpacked
batch's.
"""

from __future__ import annotations

import torch

from ..constants import IGNORE_INDEX


class PackingError(ValueError):
    """A sample that cannot be packed (longer than a row)."""


def pack_rows(lengths: list[int], max_length: int) -> list[list[int]]:
    """Item indices per row, in order: a row is closed when the next item would not fit (next fit)."""
    rows, current, used = [], [], 0
    for index, length in enumerate(lengths):
        if length > max_length:
            raise PackingError(
                f"item {index} of the batch has {length} tokens, more than a packed row's {max_length} "
                "(model_max_length): the data pipeline should have cut or skipped it"
            )
        if current and used + length > max_length:
            rows.append(current)
            current, used = [], 0
        current.append(index)
        used += length
    if current:
        rows.append(current)
    return rows


def packed_text_batch(
    items: list[dict], max_length: int, pad_token_id: int
) -> dict[str, torch.Tensor]:
    """``input_ids``, ``labels``, ``attention_mask``, ``position_ids`` ``[rows, width]`` of the items packed
    into rows of at most ``max_length`` tokens (right padded to the longest row; padding has positions of its
    own, from 0, and no labels). Items are dicts with ``input_ids`` and ``labels`` ``[seq]``."""
    rows = pack_rows([len(item["input_ids"]) for item in items], max_length)
    width = max(sum(len(items[i]["input_ids"]) for i in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
    position_ids = torch.zeros(len(rows), width, dtype=torch.long)
    for row, members in enumerate(rows):
        start = 0
        for index in members:
            ids, item_labels = torch.as_tensor(items[index]["input_ids"]), torch.as_tensor(items[index]["labels"])
            end = start + len(ids)
            input_ids[row, start:end] = ids
            labels[row, start:end] = item_labels
            labels[row, start] = IGNORE_INDEX  # never predicted from the sample before
            attention_mask[row, start:end] = 1
            position_ids[row, start:end] = torch.arange(len(ids))
            start = end
        position_ids[row, start:] = torch.arange(width - start)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask, "position_ids": position_ids}


__all__ = ["PackingError", "pack_rows", "packed_text_batch"]
