"""Batches of dataset items for the Trainer, and the data counters that travel with them.

Batches (``DataCollatorForSupervisedDataset``): ``input_ids``, ``attention_mask``, ``labels`` [batch,
seq] padded on ``tokenizer.padding_side``; ``pixel_values`` [images in the batch, 3, H, W] in sample
order (absent when no sample has an image); ``frame_features`` / ``frame_features_mask`` [images in the
batch] when a sample has precomputed frames; ``video_frame_mask`` with videos; LLaMA-VID's
``instruction_input_ids`` / ``instruction_attention_mask`` [images in the batch, L] padded with the text
decoder tokenizer's pad id; ``image_sizes`` if given; and, as plain ints summed over the batch, the keys
of ``BATCH_STAT_KEYS``, which must be popped before the model's forward (``pop_batch_stats``):
    ``num_samples``            samples in the batch (its rows, or 0 for the stand-in row below),
    ``num_vision_tokens``      image tokens in the batch,
    ``num_voco_tokens``        VoCo tokens in the batch,
    ``num_samples_skipped``    samples drawn for it but skipped (bad, or beyond ``model_max_length``),
    ``num_samples_truncated``  samples in it whose text was cut at ``model_max_length``,
    ``num_replies_dropped``    replies cut by that limit, whose labels were dropped (no partial answer is learned).
They travel with the batch because DataLoader workers are other processes: ``dataset.stats`` only
counts what this process built (all of it when ``dataloader_num_workers`` is 0).

With ``packed_row_length`` (``--packing True``, docs/design.md §2.6) the samples are not padded to one
width but laid one after another in rows of at most that many tokens (``llava_voco.train.packing``):
``position_ids`` [rows, width] restart at 0 at each sample (how the model tells them apart), the first
label of each sample is ignored (nothing is predicted across a boundary), rows are right padded to the
longest. Samples keep their order, so the per-image keys above stay in token order; the counters count
samples, not rows.

A skipped sample is an item without ``input_ids`` (``skipped_item``; or None): the collator leaves it
out of the batch and counts it, so no other sample stands in for it and none appears twice in an epoch.
A batch whose every sample was skipped becomes one row of a single pad token with no labels
(``num_samples`` 0): the Trainer still runs a step on every rank (DDP and ZeRO wait for each other),
and ``VoCoLlavaTrainer`` makes its loss 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch.nn import functional as F
from transformers import DataCollatorForSeq2Seq

from ..constants import IGNORE_INDEX
from .packing import packed_text_batch

BATCH_STAT_KEYS = (
    "num_samples",
    "num_vision_tokens",
    "num_voco_tokens",
    "num_samples_skipped",
    "num_samples_truncated",
    "num_replies_dropped",
)


def skipped_item() -> dict:
    """What the dataset returns for a sample it skips: its counters, no tokens."""
    return {"num_samples_skipped": 1}


def is_skipped(item: dict | None) -> bool:
    return item is None or "input_ids" not in item


def pop_batch_stats(batch: dict) -> dict[str, int]:
    """Remove the data counters from a collated batch (they are not model inputs) and return them."""
    return {key: batch.pop(key) for key in BATCH_STAT_KEYS if key in batch}


def _cat_per_image(key: str, with_images: Sequence[dict], num_images: Sequence[int]) -> torch.Tensor:
    """``key`` [images of a sample] of every sample with images, False for a sample that does not give it."""
    return torch.cat(
        [f[key] if key in f else torch.zeros(n, dtype=torch.bool) for f, n in zip(with_images, num_images)]
    )


@dataclass
class DataCollatorForSupervisedDataset(DataCollatorForSeq2Seq):
    """``DataCollatorForSeq2Seq`` (``tokenizer.pad`` for the ids and mask, IGNORE_INDEX for the labels, both on
    ``tokenizer.padding_side``) plus the images of the batch and the counters of ``BATCH_STAT_KEYS``.

    ``instruction_pad_token_id``: the LLaMA-VID text decoder tokenizer's pad id, for instructions of
    different lengths (required when items carry ``instruction_input_ids``).
    """

    instruction_pad_token_id: int | None = None
    packed_row_length: int | None = None  # pack the samples into rows of at most this many tokens (--packing)

    def __call__(self, features: Sequence[dict | None], return_tensors=None) -> dict:
        skipped = [f or {} for f in features if is_skipped(f)]
        features = [f for f in features if not is_skipped(f)]
        if not features:
            batch = self._no_sample_batch()
        else:
            batch = self._collate(features)
        for key in BATCH_STAT_KEYS:
            batch[key] = sum(int(f.get(key, 0)) for f in features + skipped)
        batch["num_samples"] = len(features)
        batch["num_samples_skipped"] += sum(1 for f in skipped if "num_samples_skipped" not in f)  # None items
        return batch

    def _pad_id(self) -> int:
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            raise ValueError("the tokenizer has no pad token; set one (LLaVA uses the unk token)")
        return pad_id

    def _no_sample_batch(self) -> dict:
        """One row of a single pad token, attended (a fully masked row gives NaN attention) and never learned."""
        return {
            "input_ids": torch.tensor([[self._pad_id()]]),
            "attention_mask": torch.ones(1, 1, dtype=torch.long),
            "labels": torch.full((1, 1), IGNORE_INDEX),
        }

    def _collate(self, features: Sequence[dict]) -> dict:
        if self.packed_row_length is not None:
            batch = packed_text_batch(features, self.packed_row_length, self._pad_id())
        else:
            # As lists: the parent pads labels with numpy, which is slow on a list of tensors.
            text_features = [{"input_ids": f["input_ids"].tolist(), "labels": f["labels"].tolist()} for f in features]
            batch = dict(super().__call__(text_features, return_tensors="pt"))
        pixel_values = [f["pixel_values"] for f in features if "pixel_values" in f]
        if pixel_values:
            batch["pixel_values"] = torch.cat(pixel_values)  # [images in the batch, 3, H, W]
        image_sizes = [f["image_sizes"] for f in features if "image_sizes" in f]
        if image_sizes:
            batch["image_sizes"] = torch.cat([torch.as_tensor(sizes) for sizes in image_sizes])
        with_images = [f for f in features if "pixel_values" in f or "frame_features" in f]
        num_images = [len(f.get("pixel_values", ())) + len(f.get("frame_features", ())) for f in with_images]
        if any("frame_features" in f for f in features):
            batch["frame_features"] = torch.cat([f["frame_features"] for f in features if "frame_features" in f])
            # [images in the batch] True for precomputed frames
            batch["frame_features_mask"] = _cat_per_image("frame_features_mask", with_images, num_images)
        if any("video_frame_mask" in f for f in features):
            batch["video_frame_mask"] = _cat_per_image("video_frame_mask", with_images, num_images)
        if any("instruction_input_ids" in f for f in features):  # LLaMA-VID: one row per image, right padded
            batch.update(self._instructions([f for f in features if "instruction_input_ids" in f]))
        return batch

    def _instructions(self, features: Sequence[dict]) -> dict:
        if self.instruction_pad_token_id is None:
            raise ValueError(
                "items carry LLaMA-VID instructions but the collator has no instruction_pad_token_id "
                "(the text decoder tokenizer's pad id; make_supervised_data_module sets it)"
            )
        width = max(f["instruction_input_ids"].shape[1] for f in features)

        def widen(tensor, value):
            return F.pad(tensor, (0, width - tensor.shape[1]), value=value)

        return {
            "instruction_input_ids": torch.cat(
                [widen(f["instruction_input_ids"], self.instruction_pad_token_id) for f in features]
            ),
            "instruction_attention_mask": torch.cat([widen(f["instruction_attention_mask"], 0) for f in features]),
        }


__all__ = ["BATCH_STAT_KEYS", "DataCollatorForSupervisedDataset", "is_skipped", "pop_batch_stats", "skipped_item"]
