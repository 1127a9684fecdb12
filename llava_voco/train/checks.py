"""Step 1 of the recipe, the flags alone: LLaVA's flags that would have no effect here, contradictory stages,
elastic k and distillation values, the attention backend. Each refusal is a ``TrainConfigError`` naming the
flag and why, made before anything is read from disk (``plan`` then checks the flags against the
directories they name)."""

from __future__ import annotations

import dataclasses
import os

import torch

from llava_voco.conversation import UnknownTemplateError, get_template
from llava_voco.model.attention import AttentionBackendUnavailable, attention_backend, attention_backend_names
from llava_voco.model.projectors import CompressTypeError, get_projector, parse_compress_type, projector_names

from .arguments import NEW_MODEL_PROJECTOR, SELECT_FEATURE, ModelArguments, TrainConfigError, TrainingArguments


def refuse_flags_without_effect(model_args: ModelArguments, data_args, training_args: TrainingArguments) -> None:
    def refuse(flag: str, why: str):
        raise TrainConfigError(f"{flag}: {why}")

    if model_args.mm_use_im_start_end:
        refuse("--mm_use_im_start_end True", "llava_voco lays images out as transformers' Llava does, with no "
               "<im_start>/<im_end> tokens, so the flag would have no effect; drop it or pass False")
    if model_args.mm_use_im_patch_token:
        refuse("--mm_use_im_patch_token True", "it only adds an unused <im_patch> token to the tokenizer in "
               "LLaVA; llava_voco does not add it, so the flag would have no effect; drop it or pass False")
    if model_args.mm_patch_merge_type != "flat":
        refuse(f"--mm_patch_merge_type {model_args.mm_patch_merge_type}", "LLaVA-NeXT's anyres patch merging is "
               "not implemented here; only 'flat' (LLaVA-1.5)")
    if model_args.image_grid_pinpoints is not None:
        refuse("--image_grid_pinpoints", "LLaVA-NeXT's anyres grids are not implemented here")
    if training_args.bits != 16:
        refuse(f"--bits {training_args.bits}", "4/8-bit (QLoRA) training needs bitsandbytes on CUDA and is not "
               "supported; use --bits 16 (with --bf16 True on a GPU)")
    for flag in ("double_quant", "quant_type"):
        if getattr(training_args, flag) is not None:
            refuse(f"--{flag}", "only means something with --bits 4/8, which is not supported")
    if training_args.mpt_attn_impl is not None:
        refuse("--mpt_attn_impl", "MPT language models are not supported; Llama-family models use --attn_implementation")
    if training_args.lora_weight_path:
        refuse("--lora_weight_path", "LLaVA declares it but never reads it; to continue from a LoRA run, pass its "
               "merged output directory as --model_name_or_path")
    if training_args.lora_bias not in ("none", "all", "lora_only"):
        refuse(f"--lora_bias {training_args.lora_bias}", "must be none, all or lora_only (PEFT's values)")
    if not training_args.lora_enable and not training_args.lora_merge_on_save:
        refuse("--lora_merge_on_save False", "only means something with --lora_enable True")
    if model_args.mm_projector_type is not None and model_args.mm_projector_type not in projector_names():
        refuse(f"--mm_projector_type {model_args.mm_projector_type}", f"supported: {', '.join(projector_names())}")
    refuse_other_projectors_flags(model_args)
    if model_args.mm_vision_select_feature is not None and model_args.mm_vision_select_feature not in SELECT_FEATURE:
        refuse(f"--mm_vision_select_feature {model_args.mm_vision_select_feature}", "must be patch or cls_patch")
    if not model_args.voco_mask_in_training and not model_args.voco_tokens:
        refuse("--voco_mask_in_training False", "only means something with --voco_tokens k > 0")
    if model_args.voco_tokens is not None and model_args.voco_tokens < 0:
        refuse(f"--voco_tokens {model_args.voco_tokens}", "must be >= 0")
    check_voco_training(model_args, training_args)
    # Contradictory stages: something would not train, or a flag would change nothing.
    if model_args.tune_mm_mlp_adapter and training_args.freeze_mm_mlp_adapter:
        refuse("--freeze_mm_mlp_adapter True", "with --tune_mm_mlp_adapter True nothing would train")
    if model_args.tune_mm_mlp_adapter and training_args.lora_enable:
        refuse("--lora_enable True", "the pretrain stage (--tune_mm_mlp_adapter True) trains the projector only")
    if model_args.tune_mm_mlp_adapter and model_args.unfreeze_mm_vision_tower:
        refuse("--unfreeze_mm_vision_tower True", "the pretrain stage (--tune_mm_mlp_adapter True) trains the projector only")
    if training_args.lora_enable and model_args.freeze_backbone:
        refuse("--freeze_backbone True", "with --lora_enable the LLM's own weights are frozen already; LoRA trains adapters")
    if training_args.mm_projector_lr is not None and training_args.freeze_mm_mlp_adapter:
        refuse("--mm_projector_lr", "the projector is frozen (--freeze_mm_mlp_adapter True)")
    if training_args.mm_vision_tower_lr is not None and not model_args.unfreeze_mm_vision_tower:
        refuse("--mm_vision_tower_lr", "the vision tower is frozen unless --unfreeze_mm_vision_tower True")
    ds_config = getattr(training_args, "hf_deepspeed_config", None)
    if ds_config is not None:
        if "optimizer" in ds_config.config and (training_args.mm_projector_lr or training_args.mm_vision_tower_lr):
            refuse("--mm_projector_lr", "the DeepSpeed config defines its own optimizer, which would drop the "
                   "projector's parameter group; remove its \"optimizer\" section")
        if ds_config.is_zero3() and training_args.lora_enable:
            refuse("--lora_enable True with ZeRO-3", "merging LoRA on save needs whole weights; use scripts/zero2.json")
    if model_args.model_name_or_path is None:
        refuse("--model_name_or_path", "is required")
    check_attn_implementation(model_args, training_args)
    if data_args.data_path is None:
        refuse("--data_path", "is required")
    if not os.path.isfile(data_args.data_path):
        refuse(f"--data_path {data_args.data_path}", "no such file")
    try:
        get_template(model_args.version)
    except UnknownTemplateError as error:
        refuse(f"--version {model_args.version}", str(error))


def refuse_other_projectors_flags(model_args: ModelArguments) -> None:
    """A flag only another projector method reads (``ImageProjector.train_flags``), or pooling a method does not
    take, would have no effect: refused naming the method it belongs to. (``--mm_projector_type`` left out is a
    checkpoint's own method, or ``linear`` for a new model: only flags no method reads by default are refused.)"""
    chosen = model_args.mm_projector_type
    defaults = {f.name: f.default for f in dataclasses.fields(ModelArguments)}
    read = get_projector(chosen or NEW_MODEL_PROJECTOR).train_flags
    for name in projector_names():
        if name == chosen:
            continue
        for flag in get_projector(name).train_flags:
            if getattr(model_args, flag) != defaults[flag] and flag not in read:
                raise TrainConfigError(f"--{flag} {getattr(model_args, flag)}: it only applies with --mm_projector_type {name}")
    if model_args.vision_token_pooling != defaults["vision_token_pooling"]:
        if chosen is not None and not get_projector(chosen).accepts_pooling:
            raise TrainConfigError(f"--vision_token_pooling {model_args.vision_token_pooling}: "
                                   f"{get_projector(chosen).pooling_refusal}")
        try:
            parse_compress_type(model_args.vision_token_pooling)
        except CompressTypeError as error:
            raise TrainConfigError(f"--vision_token_pooling {model_args.vision_token_pooling}: {error}") from None


def parse_voco_train_tokens(value: str) -> list[int]:
    try:
        counts = sorted({int(part) for part in value.split(",") if part.strip()})
    except ValueError:
        raise TrainConfigError(f"--voco_train_tokens {value}: comma-separated VoCo counts, e.g. 1,2,4,8") from None
    if not counts or counts[0] < 1:
        raise TrainConfigError(f"--voco_train_tokens {value}: VoCo counts >= 1, e.g. 1,2,4,8")
    return counts


def check_voco_training(model_args: ModelArguments, training_args: TrainingArguments) -> None:
    """Elastic k and distillation flags: values that can train, and nothing that would have no effect. What
    depends on the checkpoint (a saved VoCo count) is checked in ``plan.plan_loading``."""
    if model_args.voco_train_tokens is not None:
        counts = parse_voco_train_tokens(model_args.voco_train_tokens)
        if model_args.voco_tokens is not None and counts[-1] != model_args.voco_tokens:
            raise TrainConfigError(
                f"--voco_train_tokens {model_args.voco_train_tokens}: its largest count must be --voco_tokens "
                f"({model_args.voco_tokens}), the number of VoCo tokens the model is built for"
            )
        if model_args.voco_tokens == 0:
            raise TrainConfigError("--voco_train_tokens: only means something with --voco_tokens k > 0")
    for flag in ("voco_distill_weight", "voco_distill_hidden"):
        if getattr(model_args, flag) < 0:
            raise TrainConfigError(f"--{flag} {getattr(model_args, flag)}: must be >= 0")
    if model_args.voco_distill_temperature <= 0:
        raise TrainConfigError(f"--voco_distill_temperature {model_args.voco_distill_temperature}: must be > 0")
    distilling = model_args.voco_distill_weight > 0 or model_args.voco_distill_hidden > 0
    if not distilling:
        for flag, default in (("voco_distill_temperature", 1.0), ("voco_teacher", None)):
            if getattr(model_args, flag) != default:
                raise TrainConfigError(f"--{flag}: only means something with --voco_distill_weight or --voco_distill_hidden > 0")
        return
    if model_args.voco_tokens == 0:
        raise TrainConfigError("--voco_distill_weight: distils full vision tokens into VoCo tokens; it needs --voco_tokens k > 0")
    if not model_args.voco_mask_in_training:
        raise TrainConfigError("--voco_distill_weight with --voco_mask_in_training False: student and teacher would "
                               "see the same tokens, so every distillation term would be 0")
    if model_args.tune_mm_mlp_adapter:
        raise TrainConfigError("--voco_distill_weight: the pretrain stage (--tune_mm_mlp_adapter True) has no VoCo "
                               "path to distil into (the LLM is frozen)")
    if model_args.voco_teacher is not None:
        if not os.path.isfile(os.path.join(model_args.voco_teacher, "config.json")):
            raise TrainConfigError(f"--voco_teacher {model_args.voco_teacher}: not a checkpoint directory (no config.json)")
        ds_config = getattr(training_args, "hf_deepspeed_config", None)
        if ds_config is not None and ds_config.is_zero3():
            raise TrainConfigError("--voco_teacher with ZeRO-3: a second model would need its own DeepSpeed engine; "
                                   "use the default teacher (the same weights with the VoCo mask off) or scripts/zero2.json")


def check_attn_implementation(model_args: ModelArguments, training_args: TrainingArguments) -> None:
    """``--attn_implementation``: a backend this entry can train with, available here (checked before any
    weight is read)."""
    attn = model_args.attn_implementation
    if attn not in attention_backend_names():
        raise TrainConfigError(f"--attn_implementation {attn}: supported: {', '.join(attention_backend_names())}")
    try:
        attention_backend(attn).check(on_cpu=training_args.use_cpu or not torch.cuda.is_available(), training=True)
    except AttentionBackendUnavailable as error:
        raise TrainConfigError(f"--attn_implementation {attn}: {error}") from None
