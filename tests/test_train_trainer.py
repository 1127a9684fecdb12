"""VoCoLlavaTrainer's batch handling without a training run: the ZeRO-3 blank-image row for every projector
(real tiny models, one forward each), and a batch whose every sample was skipped."""

from __future__ import annotations

import pytest
import torch
from transformers import LlavaConfig, TrainingArguments

from llava_voco import VoCoLlavaConfig, VoCoLlavaForConditionalGeneration, VoCoLlavaProcessor
from llava_voco.constants import IGNORE_INDEX
from llava_voco.demo.tiny import train_wordpiece_tokenizer
from llava_voco.model.image_inputs import tokens_per_image, vision_patch_features
from llava_voco.train.collator import DataCollatorForSupervisedDataset, skipped_item
from llava_voco.train.trainer import CompressionStats, VoCoLlavaTrainer, with_blank_image_row

QFORMER = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4, "intermediate_size": 64,
           "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}

# Each projector and pooling the training entry builds: (config fields, processor fields, VoCo tokens).
PROJECTORS = {
    "linear, CLS kept": ({"mm_projector_type": "linear", "vision_feature_select_strategy": "full"}, {}, 0),
    "mlp2x_gelu, VoCo": ({}, {}, 1),
    "pooled mean": ({"vision_token_pooling": "mean"}, {"vision_token_pooling": "mean"}, 0),
    "pooled grid:2, VoCo": ({"vision_token_pooling": "grid:2"}, {"vision_token_pooling": "grid:2"}, 2),
    "llamavid": ({"mm_projector_type": "llamavid", "llamavid_num_query": 4, "llamavid_compress_type": "grid:2",
                  "llamavid_video_compress_type": "mean"},
                 {"llamavid_compress_type": "grid:2", "llamavid_video_compress_type": "mean"}, 0),
    "llamavid, VoCo": ({"mm_projector_type": "llamavid", "llamavid_num_query": 4, "llamavid_compress_type": "none",
                        "llamavid_video_compress_type": "mean"},
                       {"llamavid_compress_type": "none", "llamavid_video_compress_type": "mean"}, 1),
}


def build(voco_dir, name):
    """A randomly initialised model with the projector ``name`` (the tiny LLaVA's sizes) and its processor."""
    config_fields, processor_fields, voco_tokens = PROJECTORS[name]
    base = LlavaConfig.from_pretrained(voco_dir).to_dict()
    base.pop("model_type")
    bert = train_wordpiece_tokenizer()
    if config_fields.get("mm_projector_type") == "llamavid":
        config_fields = {**config_fields, "llamavid_qformer": {**QFORMER, "vocab_size": len(bert)}}
    voco_token_id = VoCoLlavaConfig.from_pretrained(voco_dir).voco_token_id
    config = VoCoLlavaConfig(**{**base, **config_fields, "voco_tokens": voco_tokens, "voco_token_id": voco_token_id})
    torch.manual_seed(0)
    model = VoCoLlavaForConditionalGeneration(config).eval()
    processor = VoCoLlavaProcessor.from_pretrained(voco_dir, voco_tokens=voco_tokens, **processor_fields)
    if config.mm_projector_type == "llamavid":
        bert.pad_token = "[MASK]"  # a pad id that is not 0, so that padding with 0 would show
        processor.text_decoder_tokenizer = bert
    return model, processor


def text_batch(processor) -> dict:
    """Two text-only rows of different lengths, right padded, labels on the real tokens."""
    batch = dict(processor.tokenizer(["USER: Say a word. ASSISTANT: seven</s>", "USER: Hi ASSISTANT: hello</s>"],
                                     padding=True, return_tensors="pt"))
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
    return batch


class VisionPasses:
    def __init__(self, model):
        self.count = 0
        self.handle = model.model.vision_tower.register_forward_hook(self.hook)

    def hook(self, *_):
        self.count += 1


@pytest.mark.parametrize("name", list(PROJECTORS))
def test_blank_image_row_runs_the_vision_path_and_keeps_the_loss(voco_dir, name):
    """A text-only batch under ZeRO-3 gets one more row, a blank image with the tokens this model gives an
    image (tokens_per_image: pooled, LLaMA-VID's context + content, CLS, VoCo) and, for LLaMA-VID, an
    empty instruction: the vision tower and projector run, and the loss is the text rows' own."""
    model, processor = build(voco_dir, name)
    batch = text_batch(processor)
    inputs = with_blank_image_row(batch, model, processor)
    count = tokens_per_image(model.config)
    blank = inputs["input_ids"][-1]
    assert int((blank == model.config.image_token_id).sum()) == count.image
    assert int((blank == model.config.voco_token_id).sum()) == count.voco
    assert (inputs["labels"][-1] == IGNORE_INDEX).all() and inputs["pixel_values"].shape[0] == 1
    if model.config.mm_projector_type == "llamavid":
        assert inputs["instruction_input_ids"].shape[0] == 1
    passes = VisionPasses(model)
    with torch.no_grad():
        loss = model(**batch).loss
        assert passes.count == 0
        loss_with_blank_row = model(**inputs).loss
        assert passes.count == 1
    torch.testing.assert_close(loss_with_blank_row, loss, atol=1e-5, rtol=0)


def test_blank_image_row_beside_llamavid_precomputed_frames(voco_dir, digit_images):
    """A LLaMA-VID batch of precomputed frames only (no pixels): the blank image is its last image, its
    instruction row is padded with the other rows to one width, with the text decoder's pad id."""
    model, processor = build(voco_dir, "llamavid")
    pixels = processor.image_processor(digit_images[:3], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        features = vision_patch_features(model.model, pixels)  # [3, N, C]
    batch = dict(processor(videos=[features], text="USER: <video> What is the sum of the digits? ASSISTANT: 12",
                           return_tensors="pt"))
    batch["labels"] = batch["input_ids"].clone()
    assert "pixel_values" not in batch and batch["instruction_input_ids"].shape[0] == 3
    inputs = with_blank_image_row(batch, model, processor)
    assert inputs["frame_features_mask"].tolist() == [True, True, True, False]
    assert inputs["video_frame_mask"].tolist() == [True, True, True, False]
    ids, mask = inputs["instruction_input_ids"], inputs["instruction_attention_mask"]
    assert ids.shape == (4, batch["instruction_input_ids"].shape[1])
    pad_id = processor.text_decoder_tokenizer.pad_token_id
    assert (ids[-1][mask[-1] == 0] == pad_id).all() and mask[-1].sum() >= 1
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).loss, model(**batch).loss, atol=1e-5, rtol=0)


def test_blank_image_row_needs_a_pad_token(voco_dir):
    model, processor = build(voco_dir, "mlp2x_gelu, VoCo")
    batch = text_batch(processor)
    processor.tokenizer.pad_token = None
    with pytest.raises(ValueError, match="no pad token"):
        with_blank_image_row(batch, model, processor)


@pytest.mark.parametrize("blank_image", [False, True], ids=["no ZeRO-3", "ZeRO-3 blank image"])
def test_a_batch_of_skipped_samples_learns_nothing(voco_dir, tmp_path, blank_image):
    """Every sample of the batch was skipped: the step still runs a forward (every rank must), its loss is 0
    (not the NaN of a mean over no label) and so are its gradients; no sample is counted, the skips are."""
    model, processor = build(voco_dir, "mlp2x_gelu, VoCo")
    model.train()
    stats = CompressionStats()
    trainer = VoCoLlavaTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True),
                               processing_class=processor, compression_stats=stats,
                               blank_image_for_text_batches=blank_image)
    collate = DataCollatorForSupervisedDataset(tokenizer=processor.tokenizer, label_pad_token_id=IGNORE_INDEX)
    batch = collate([skipped_item(), None])
    passes = VisionPasses(model)
    loss = trainer.compute_loss(model, batch, num_items_in_batch=torch.tensor(0))
    assert passes.count == (1 if blank_image else 0)
    assert loss.item() == 0.0
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(bool((g == 0).all()) for g in grads)
    assert (stats.samples, stats.skipped, stats.tokens) == (0, 2, 0)
