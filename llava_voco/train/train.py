"""Train a LLaVA model like LLaVA does, with one more flag: ``--voco_tokens k``.

    python -m llava_voco.train --model_name_or_path ... --version v1 --data_path ... --image_folder ...
        --vision_tower ... --mm_projector_type mlp2x_gelu ... --voco_tokens 1 --report_to wandb
    deepspeed llava_voco/train/train.py --deepspeed scripts/zero2.json ...      (several processes)

LLaVA's flags are accepted verbatim; one that would have no effect here is refused with a message saying
why. ``main`` is the recipe, read top to bottom:
  1. parse the three argument groups (model, data, training; ``llava_voco.train.arguments``);
  2. refuse flags without effect and contradictory stages (``refuse_flags_without_effect``), then every
     combination of flags and the directories they name that cannot train (``plan_loading``): all before
     any weight is read, each as one line (``cli``);
  3. build the model and processor, one of LLaVA's two set-ups (``llava_voco.train.model_setup``): an
     LLM directory + ``--vision_tower``, or a full Llava / VoCo-Llava checkpoint (``--voco_tokens k`` on a
     plain Llava checkpoint adds VoCo as ``llava_voco.add_voco_to_llava`` does), in one dtype (bf16 under
     ``--bf16``, fp16 under ``--fp16`` with DeepSpeed, else fp32), with the attention backend asked for
     (logged; ``flash_attention_2`` runs the VoCo rule through flash-attn's varlen kernel);
  4. choose what trains (the stage): pretrain (``--tune_mm_mlp_adapter``: the projector only),
     finetune (LLM + projector; the vision tower only with ``--unfreeze_mm_vision_tower``),
     ``--freeze_backbone``, ``--freeze_mm_mlp_adapter``, LoRA (``--lora_enable``, through PEFT);
  5. the data (``llava_voco.train.data``): LLaVA's JSON, templates, truncation and collator (``--packing``:
     each batch's samples in padding-free rows, docs/design.md §2.6);
  6. the Trainer (``VoCoLlavaTrainer``: LLaVA's sampler, projector learning rate, projector saving; with
     ``--voco_distill_weight`` / ``--voco_distill_hidden`` the distillation terms against full vision tokens,
     ``llava_voco.train.distillation``),
     resuming from the last ``checkpoint-*`` in ``--output_dir`` as LLaVA does (or from
     ``--resume_from_checkpoint``);
  7. save: a directory that loads with ``from_pretrained`` (after ``import llava_voco``), with its
     processor; the pretrain stage also writes ``mm_projector.safetensors`` for the next stage's
     ``--pretrain_mm_mlp_adapter``; LoRA is merged into the weights on save (``--lora_merge_on_save``).
"""

from __future__ import annotations

import glob
import logging
import os
import re
import sys

if __package__ in (None, ""):  # run as a file (``deepspeed llava_voco/train/train.py``), as LLaVA's scripts do
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    __package__ = "llava_voco.train"

from transformers import set_seed
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

from llava_voco.conversation import get_template
from llava_voco.model.image_inputs import tokens_per_image

from .arguments import TrainConfigError, one_line, parse_args, refuse_flags_without_effect
from .data import BadSamplesError, DataError, make_supervised_data_module, sample_error_line
from .distillation import VoCoDistillation
from .model_setup import (
    attention_backends,
    build_model_and_processor,
    build_teacher,
    plan_loading,
    plan_teacher,
    save_lora,
    set_trainable,
)
from .trainer import CompressionStats, VoCoLlavaTrainer

logger = logging.getLogger("llava_voco.train")


def main(argv: list[str] | None = None) -> VoCoLlavaTrainer:
    # 1-2. Flags: parsed, then refused where they would have no effect.
    model_args, data_args, training_args = parse_args(argv)
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if training_args.should_log else logging.WARNING,
    )
    refuse_flags_without_effect(model_args, data_args, training_args)
    plan = plan_loading(model_args, training_args)  # the last refusals: nothing has been loaded yet
    teacher_plan = plan_teacher(model_args, training_args, plan)
    # The process group first: under ZeRO-3 the weights are partitioned as they load.
    training_args.device
    if training_args.deepspeed:
        import deepspeed

        deepspeed.init_distributed()  # adopts torch's group (the CPU path of TrainingArguments leaves it out)
    set_seed(training_args.seed)

    # 3. Model and processor.
    model, processor = build_model_and_processor(model_args, training_args, plan)
    logger.info(
        "model: %s projector, voco_tokens=%d (%s mask), %d image tokens per image",
        model.config.mm_projector_type, model.config.voco_tokens, model.config.voco_mask_mode,
        tokens_per_image(model.config).image,
    )
    logger.info("attention: %s", attention_backends(model))
    logger.info("weights in %s%s", str(plan.dtype).removeprefix("torch."), precision_note(training_args))
    if data_args.packing:
        logger.info("packing: each batch's samples in rows of at most %d tokens", training_args.model_max_length)
    # The checkpoint carries its prompt format: apply_chat_template, the chat CLI and the eval entry prompt
    # with the --version the model learns here.
    processor.chat_template = get_template(model_args.version).chat_template()
    processor.conversation_version = model_args.version

    # 4. What trains (and, when distilling, what teaches).
    model = set_trainable(model, model_args, training_args)
    distillation = build_distillation(model_args, training_args, model, processor, teacher_plan)

    # 5. Data: every sample checked before the first step (--check_samples).
    try:
        data_module = make_supervised_data_module(
            processor, data_args, version=model_args.version, model_max_length=training_args.model_max_length,
            vision_hidden_size=model.config.vision_config.hidden_size,  # features files of another width: named
        )
    except DataError:
        raise
    except (ValueError, OSError, ImportError) as error:  # the data file, its folders, PyAV: one line, as a flag is
        raise TrainConfigError(str(error)) from error

    # 6. Trainer, resuming where a previous run stopped.
    base = model.get_base_model() if training_args.lora_enable else model
    trainer = VoCoLlavaTrainer(
        model=model,
        args=training_args,
        processing_class=processor,
        group_by_modality_length=training_args.group_by_modality_length,
        mm_projector_lr=training_args.mm_projector_lr,
        mm_vision_tower_lr=training_args.mm_vision_tower_lr,
        save_projector_only=model_args.tune_mm_mlp_adapter,
        compression_stats=CompressionStats(skipped_up_front=skipped_before_training(data_module["train_dataset"])),
        blank_image_for_text_batches=needs_blank_image_rows(base, training_args),
        distillation=distillation,
        voco_mask=model_args.voco_mask_in_training,
        **data_module,
    )
    resume = training_args.resume_from_checkpoint
    if resume is None and os.path.isdir(training_args.output_dir):
        resume = last_checkpoint(training_args.output_dir)  # LLaVA resumes from output_dir's checkpoints
    if resume:
        logger.info("resuming from %s", resume)
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_state()

    # 7. Save.
    output_dir = training_args.output_dir
    if training_args.lora_enable:
        save_lora(trainer, processor, output_dir, merge=training_args.lora_merge_on_save)
    else:
        base.config.text_config.use_cache = True
        trainer.save_full_model_too = True  # the pretrain stage writes mm_projector.safetensors as well
        trainer.save_model(output_dir)
    if trainer.args.should_save:
        logger.info("saved to %s", output_dir)
    return trainer


def build_distillation(model_args, training_args, model, processor, teacher_plan) -> VoCoDistillation | None:
    """The distillation terms asked for (``--voco_distill_weight``, ``--voco_distill_hidden``), with the
    teacher: ``--voco_teacher``'s checkpoint (frozen), else the model itself with the VoCo mask off."""
    if model_args.voco_distill_weight == 0 and model_args.voco_distill_hidden == 0:
        return None
    teacher = None
    if teacher_plan is not None:
        base = model.get_base_model() if training_args.lora_enable else model
        teacher = build_teacher(model_args, training_args, teacher_plan, base, processor)
    logger.info(
        "distillation: %g * KL(teacher || student) at temperature %g%s, teacher: %s",
        model_args.voco_distill_weight, model_args.voco_distill_temperature,
        f" + {model_args.voco_distill_hidden:g} * hidden-state MSE at the text positions" if model_args.voco_distill_hidden else "",
        model_args.voco_teacher or "the same weights with the VoCo mask off",
    )
    return VoCoDistillation(weight=model_args.voco_distill_weight, temperature=model_args.voco_distill_temperature,
                            hidden_weight=model_args.voco_distill_hidden, teacher=teacher)


def needs_blank_image_rows(model, training_args) -> bool:
    """Whether a text-only batch gets a blank-image row (``trainer.with_blank_image_row``): on several processes
    every rank must run the vision path at every step (ZeRO-3 gathers each module's weights as it runs, ZeRO-2
    and DDP reduce every trained parameter's gradient); and wherever the vision path trains, so that its
    parameters get a zero gradient on a text-only batch on one process as on many (Adam moves a parameter
    whose gradient is zero by its momentum but skips one that has none), as in LLaVA, which gives every
    text-only sample a zero image."""
    if is_deepspeed_zero3_enabled() or training_args.world_size > 1:
        return True
    vision_path = list(model.model.vision_tower.parameters()) + list(model.model.multi_modal_projector.parameters())
    return any(p.requires_grad for p in vision_path)


def precision_note(training_args) -> str:
    if training_args.deepspeed and (training_args.bf16 or training_args.fp16):
        return f" (DeepSpeed {'bf16' if training_args.bf16 else 'fp16'} mode: fp32 master weights in the optimizer)"
    if training_args.fp16:
        return " (torch autocast to fp16; its gradient scaler needs fp32 weights)"
    if training_args.bf16:
        return " (and the optimizer steps them in bf16, as LLaVA without DeepSpeed does)"
    return ""


def last_checkpoint(output_dir: str) -> str | None:
    checkpoints = glob.glob(os.path.join(output_dir, "checkpoint-*"))
    checkpoints = [c for c in checkpoints if re.fullmatch(r"checkpoint-\d+", os.path.basename(c))]
    return max(checkpoints, key=lambda c: int(c.rsplit("-", 1)[1])) if checkpoints else None


def skipped_before_training(dataset) -> int:
    """Samples the dataset dropped when it checked every sample before training (``--check_samples``)."""
    samples = getattr(dataset, "samples", None)
    return len(samples) - len(dataset) if samples is not None else 0


def cli(argv: list[str] | None = None) -> int:
    try:
        main(argv)
    except TrainConfigError as error:
        print(f"llava-voco-train: error: {one_line(str(error))}", file=sys.stderr)
        return 2
    except DataError as error:  # before training (the check of every sample) or at a sample drawn mid-run
        mid_run = not isinstance(error, BadSamplesError)  # the progress bar's line is left open: start a new one
        print(f"{chr(10) if mid_run else ''}llava-voco-train: error: {one_line(sample_error_line(error))}",
              file=sys.stderr)
        return 1
    end_process_group()
    return 0


def end_process_group() -> None:
    """Several processes: wait for every rank, then tear the process group down before the interpreter exits.
    Left to interpreter shutdown, a rank of a CPU run under DeepSpeed sometimes aborted after saving
    ("terminate called without an active exception": a communication thread destroyed while running)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(cli())