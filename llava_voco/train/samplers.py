"""LLaVA's samplers: ``--group_by_length`` and ``--group_by_modality_length`` (image and text-only
samples batched apart, each grouped by length)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch.utils.data import Sampler
from transformers.trainer_pt_utils import get_length_grouped_indices


def modality_length_grouped_indices(
    lengths: Sequence[int], batch_size: int, world_size: int = 1, generator: torch.Generator | None = None
) -> list[int]:
    """LLaVA's grouping: image samples (positive length) and text-only samples (negative) are batched
    apart, each grouped by length; megabatches of ``batch_size * world_size`` (one batch per rank) are
    shuffled together. The leftovers of each modality come last, image then text, so at most one
    batch of the epoch holds both."""
    if any(length == 0 for length in lengths):
        raise ValueError("a modality length of 0 is neither image (> 0) nor text-only (< 0)")
    megabatch = batch_size * world_size
    groups = [[i for i, length in enumerate(lengths) if length > 0], [i for i, length in enumerate(lengths) if length < 0]]
    if not groups[0] or not groups[1]:
        return get_length_grouped_indices([abs(length) for length in lengths], megabatch, generator=generator)
    full, leftovers = [], []
    for group in groups:
        order = get_length_grouped_indices([abs(lengths[i]) for i in group], megabatch, generator=generator)
        ordered = [group[j] for j in order]
        complete = len(ordered) - len(ordered) % megabatch
        full.extend(ordered[start : start + megabatch] for start in range(0, complete, megabatch))
        leftovers.extend(ordered[complete:])
    shuffled = torch.randperm(len(full), generator=generator).tolist()
    return [i for k in shuffled for i in full[k]] + leftovers


class LengthGroupedSampler(Sampler):
    """``--group_by_length`` / ``--group_by_modality_length`` sampler for the Trainer.

    ``lengths``: ``dataset.lengths``, or ``dataset.modality_lengths`` with ``group_by_modality=True``.
    ``world_size``: ranks times gradient accumulation steps, as LLaVA passes it. Plain grouping is
    transformers' ``get_length_grouped_indices``.
    """

    def __init__(
        self,
        batch_size: int,
        world_size: int = 1,
        lengths: Sequence[int] | None = None,
        generator: torch.Generator | None = None,
        group_by_modality: bool = False,
    ):
        if lengths is None:
            raise ValueError("LengthGroupedSampler needs lengths (dataset.lengths or dataset.modality_lengths)")
        self.batch_size, self.world_size, self.generator = batch_size, world_size, generator
        self.lengths = list(lengths)
        self.group_by_modality = group_by_modality

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        if self.group_by_modality:
            indices = modality_length_grouped_indices(self.lengths, self.batch_size, self.world_size, self.generator)
        else:
            indices = get_length_grouped_indices(self.lengths, self.batch_size * self.world_size, generator=self.generator)
        return iter(indices)


__all__ = ["LengthGroupedSampler", "modality_length_grouped_indices"]
