"""The recipe's last steps: where a run resumes (LLaVA resumes from ``--output_dir``'s last checkpoint) and
what it saves: a directory that loads with ``from_pretrained`` (after ``import llava_voco``) with its
processor; the pretrain stage also writes ``mm_projector.safetensors``; LoRA is merged into the weights on
save (``--lora_merge_on_save``) or saved as a PEFT adapter."""

from __future__ import annotations

import glob
import logging
import os
import re

logger = logging.getLogger("llava_voco.train")


def save_lora(trainer, processor, output_dir: str, merge: bool) -> None:
    model = trainer.accelerator.unwrap_model(trainer.model)
    if not trainer.args.should_save:
        return
    if not merge:
        model.save_pretrained(output_dir)  # adapter_config.json + adapter_model.safetensors (projector included)
        processor.save_pretrained(output_dir)
        return
    merged = model.merge_and_unload()
    merged.config.text_config.use_cache = True
    merged.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)


def last_checkpoint(output_dir: str) -> str | None:
    checkpoints = glob.glob(os.path.join(output_dir, "checkpoint-*"))
    checkpoints = [c for c in checkpoints if re.fullmatch(r"checkpoint-\d+", os.path.basename(c))]
    return max(checkpoints, key=lambda c: int(c.rsplit("-", 1)[1])) if checkpoints else None


def resume_from(training_args) -> str | None:
    """``--resume_from_checkpoint``, else the last ``checkpoint-*`` in ``--output_dir`` (LLaVA resumes from them)."""
    resume = training_args.resume_from_checkpoint
    if resume is None and os.path.isdir(training_args.output_dir):
        resume = last_checkpoint(training_args.output_dir)
    if resume:
        logger.info("resuming from %s", resume)
    return resume


def save_trained(trainer, processor, training_args) -> None:
    """The trained model and its processor in ``--output_dir``: LoRA merged (or the adapter), else the whole
    model, plus ``mm_projector.safetensors`` in the pretrain stage."""
    output_dir = training_args.output_dir
    if training_args.lora_enable:
        save_lora(trainer, processor, output_dir, merge=training_args.lora_merge_on_save)
    else:
        trainer.accelerator.unwrap_model(trainer.model).config.text_config.use_cache = True
        trainer.save_full_model_too = True  # the pretrain stage writes mm_projector.safetensors as well
        trainer.save_model(output_dir)
    if trainer.args.should_save:
        logger.info("saved to %s", output_dir)
