"""Distillation's teacher (``--voco_teacher``): its checks before any weight is read (``plan_teacher``: a
Llava / VoCo-Llava checkpoint reading the student's token ids), loading it frozen with its VoCo mask off
(``build_teacher``), and the distillation terms the Trainer adds (``build_distillation``; without
``--voco_teacher`` the teacher is the student's own weights with the mask off)."""

from __future__ import annotations

import logging
from dataclasses import replace

from transformers import AutoTokenizer

from llava_voco.constants import VOCO_TOKEN
from llava_voco.model.image_inputs import tokens_per_image

from .arguments import ModelArguments, TrainConfigError, TrainingArguments, one_line
from .building import build_from_llava_checkpoint
from .distillation import VoCoDistillation
from .plan import LoadPlan, plan_loading

logger = logging.getLogger("llava_voco.train")


def teacher_model_args(model_args: ModelArguments, student_plan: LoadPlan) -> ModelArguments:
    """The flags that load ``--voco_teacher`` as a checkpoint (set-up (b)) with the student's VoCo count, so that
    it reads the same token ids (a plain Llava teacher gets ``<voco>`` as the student did)."""
    saved = student_plan.checkpoint_config
    voco_tokens = model_args.voco_tokens if model_args.voco_tokens is not None else getattr(saved, "voco_tokens", 0)
    return replace(
        model_args, model_name_or_path=model_args.voco_teacher, voco_tokens=voco_tokens, voco_train_tokens=None,
        vision_tower=None, pretrain_mm_mlp_adapter=None, mm_projector_type=None, vision_token_pooling="none",
        mm_vision_select_feature=None, mm_vision_select_layer=None,
    )


def plan_teacher(model_args: ModelArguments, training_args: TrainingArguments, student_plan: LoadPlan) -> LoadPlan | None:
    """``--voco_teacher``'s checks before any weight is read: a Llava / VoCo-Llava checkpoint whose tokenizer
    has the student's vocabulary (the teacher reads the student's token ids)."""
    if model_args.voco_teacher is None:
        return None
    teacher_args = teacher_model_args(model_args, student_plan)
    try:
        plan = plan_loading(teacher_args, training_args)
    except TrainConfigError as error:
        raise TrainConfigError(f"--voco_teacher {model_args.voco_teacher}: {error}") from None
    if plan.checkpoint_config is None:
        raise TrainConfigError(f"--voco_teacher {model_args.voco_teacher}: not a Llava or VoCo-Llava checkpoint")
    vocabularies = []
    for flag, path in (("--model_name_or_path", model_args.model_name_or_path), ("--voco_teacher", model_args.voco_teacher)):
        try:
            vocabulary = AutoTokenizer.from_pretrained(path, cache_dir=training_args.cache_dir).get_vocab()
        except (OSError, ValueError) as error:
            raise TrainConfigError(f"{flag} {path}: its tokenizer does not load ({one_line(str(error))})") from None
        vocabulary.pop(VOCO_TOKEN, None)  # added to whichever lacks it, with the same id
        vocabularies.append(vocabulary)
    if vocabularies[0] != vocabularies[1]:
        differing = sorted(set(vocabularies[0].items()) ^ set(vocabularies[1].items()))[:3]
        raise TrainConfigError(
            f"--voco_teacher {model_args.voco_teacher}: its tokenizer differs from the student's ({model_args.model_name_or_path}; "
            f"e.g. {differing}); the teacher must read the same token ids"
        )
    return plan


def build_teacher(model_args: ModelArguments, training_args: TrainingArguments, plan: LoadPlan, student, processor):
    """``--voco_teacher``, frozen, in eval mode, seeing every vision token (its VoCo mask off)."""
    teacher, teacher_processor = build_from_llava_checkpoint(teacher_model_args(model_args, plan), training_args, plan)
    for name in ("image_token_id", "voco_token_id"):
        if getattr(teacher.config, name) != getattr(student.config, name):
            raise TrainConfigError(
                f"--voco_teacher {model_args.voco_teacher}: its {name} is {getattr(teacher.config, name)}, the "
                f"student's {getattr(student.config, name)}"
            )
    if tokens_per_image(teacher.config) != tokens_per_image(student.config):
        raise TrainConfigError(
            f"--voco_teacher {model_args.voco_teacher}: its images become {tokens_per_image(teacher.config)} tokens, "
            f"the student's {tokens_per_image(student.config)}"
        )
    teacher.requires_grad_(False).eval()  # its forwards run with voco_mask=False (VoCoDistillation)
    teacher.config.text_config.use_cache = False
    return teacher.to(training_args.device)


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
