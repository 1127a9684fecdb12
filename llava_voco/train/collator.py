"""Batches of dataset items for the Trainer, and the data counters that travel with them.

Batches (``DataCollatorForSupervisedDataset``): ``input_ids``, ``attention_mask``, ``labels`` [batch,
seq] padded on ``tokenizer.padding_side``; ``pixel_values`` [images in the batch, 3, H, W] in sample
order (absent when no sample has an image); ``frame_features`` / ``frame_features_mask`` [images in the
batch] when a sample has precomputed frames; ``image_sizes`` if given; and, as plain ints summed over
the batch, the keys of ``BATCH_STAT_KEYS``, which must be popped before the model's forward
(``pop_batch_stats``):
    ``num_vision_tokens``      image tokens in the batch,
    ``num_voco_tokens``        VoCo tokens in the batch,
    ``num_samples_skipped``    samples skipped (bad, or image block beyond ``model_max_length``) to fill it,
    ``num_samples_truncated``  samples in it whose text was cut at ``model_max_length``.
They travel with the batch because DataLoader workers are other processes: ``dataset.stats`` only
counts what this process built (all of it when ``dataloader_num_workers`` is 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch.nn import functional as F
from transformers import DataCollatorForSeq2Seq

BATCH_STAT_KEYS = ("num_vision_tokens", "num_voco_tokens", "num_samples_skipped", "num_samples_truncated")


def pop_batch_stats(batch: dict) -> dict[str, int]:
    """Remove the data counters from a collated batch (they are not model inputs) and return them."""
    return {key: batch.pop(key) for key in BATCH_STAT_KEYS if key in batch}


@dataclass
class DataCollatorForSupervisedDataset(DataCollatorForSeq2Seq):
    """``DataCollatorForSeq2Seq`` (``tokenizer.pad`` for the ids and mask, IGNORE_INDEX for the labels, both on
    ``tokenizer.padding_side``) plus the images of the batch and the counters of ``BATCH_STAT_KEYS``."""

    def __call__(self, features: Sequence[dict], return_tensors=None) -> dict:
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
            batch["frame_features_mask"] = torch.cat(  # [images in the batch] True for precomputed frames
                [f["frame_features_mask"] if "frame_features_mask" in f else torch.zeros(n, dtype=torch.bool)
                 for f, n in zip(with_images, num_images)]
            )
        if any("video_frame_mask" in f for f in features):
            batch["video_frame_mask"] = torch.cat(
                [f["video_frame_mask"] if "video_frame_mask" in f else torch.zeros(n, dtype=torch.bool)
                 for f, n in zip(with_images, num_images)]
            )
        if any("instruction_input_ids" in f for f in features):  # LLaMA-VID: one row per image, right padded
            width = max(f["instruction_input_ids"].shape[1] for f in features if "instruction_input_ids" in f)
            ids = [F.pad(f["instruction_input_ids"], (0, width - f["instruction_input_ids"].shape[1]))
                   for f in features if "instruction_input_ids" in f]
            masks = [F.pad(f["instruction_attention_mask"], (0, width - f["instruction_attention_mask"].shape[1]))
                     for f in features if "instruction_input_ids" in f]
            batch["instruction_input_ids"], batch["instruction_attention_mask"] = torch.cat(ids), torch.cat(masks)
        for key in BATCH_STAT_KEYS:
            batch[key] = sum(int(f.get(key, 0)) for f in features)
        return batch


__all__ = ["BATCH_STAT_KEYS", "DataCollatorForSupervisedDataset", "pop_batch_stats"]
