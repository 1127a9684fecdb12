"""What the run is, in the log before training: the model's compression, the attention backend each part
runs (never a silent fall back), the weights' dtype and what the optimizer steps, packing."""

from __future__ import annotations

import logging

from llava_voco.model.attention import backend_running
from llava_voco.model.image_inputs import tokens_per_image

logger = logging.getLogger("llava_voco.train")


def log_setup(model, plan, data_args, training_args) -> None:
    """The model's compression, each part's attention backend, the weights' dtype and packing, logged once the
    model is built (``plan``: the ``LoadPlan`` it was built by)."""
    logger.info(
        "model: %s projector, voco_tokens=%d (%s mask), %d image tokens per image",
        model.config.mm_projector_type, model.config.voco_tokens, model.config.voco_mask_mode,
        tokens_per_image(model.config).image,
    )
    logger.info("attention: %s", attention_backends(model))
    logger.info("weights in %s%s", str(plan.dtype).removeprefix("torch."), precision_note(training_args))
    if data_args.packing:
        logger.info("packing: each batch's samples in rows of at most %d tokens", training_args.model_max_length)


def attention_backends(model) -> str:
    """Which attention backend each part runs, for the log (never a silent fall back)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    text = base.model.language_model.config._attn_implementation
    vision = base.model.vision_tower.config._attn_implementation
    if base.config.voco_tokens == 0:
        return f"language model {text} (VoCo off: causal; packed rows kept apart), vision tower {vision}"
    backend = backend_running(text)
    return f"language model {text} ({backend.log if backend else 'not in the backend table'}), vision tower {vision}"


def precision_note(training_args) -> str:
    if training_args.deepspeed and (training_args.bf16 or training_args.fp16):
        return f" (DeepSpeed {'bf16' if training_args.bf16 else 'fp16'} mode: fp32 master weights in the optimizer)"
    if training_args.fp16:
        return " (torch autocast to fp16; its gradient scaler needs fp32 weights)"
    if training_args.bf16:
        return " (and the optimizer steps them in bf16, as LLaVA without DeepSpeed does)"
    return ""
