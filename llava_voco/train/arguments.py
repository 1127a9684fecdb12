"""The training entry's flags: LLaVA's names, types and meanings (``ModelArguments``, ``TrainingArguments``;
the data flags are ``llava_voco.train.data.DataArguments``), and the refusal of flags that LLaVA accepts but
that would have no effect here (``refuse_flags_without_effect``): refused with a message saying why, never
silently ignored.

Defaults that LLaVA sets to values we cannot honour (or that depend on the checkpoint) are None here and
resolved in ``llava_voco.train.model_setup.build_model_and_processor``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import torch
import transformers
from transformers import HfArgumentParser

from llava_voco.conversation import UnknownTemplateError, get_template
from llava_voco.model.configuration_voco_llava import VoCoLlavaConfig
from llava_voco.model.projectors import CompressTypeError, get_projector, parse_compress_type, projector_names
from llava_voco.model.attention import AttentionBackendUnavailable, attention_backend, attention_backend_names

from .data import DataArguments

# LLaVA's --mm_projector_type default: the projector of a model built from an LLM and a vision tower.
NEW_MODEL_PROJECTOR = "linear"
# LLaVA's --mm_vision_select_feature -> transformers' vision_feature_select_strategy.
SELECT_FEATURE = {"patch": "default", "cls_patch": "full"}


class TrainConfigError(ValueError):
    """A command line that cannot train as asked; the message says which flag and why."""


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "An LLM directory (with --vision_tower), or a full Llava / VoCo-Llava checkpoint."},
    )
    version: str = field(default="v1", metadata={"help": "Conversation template (LLaVA's --version names)."})
    freeze_backbone: bool = field(default=False, metadata={"help": "Freeze the LLM body (not lm_head, not the projector)."})
    tune_mm_mlp_adapter: bool = field(default=False, metadata={"help": "Pretrain stage: only the projector trains."})
    vision_tower: str | None = field(default=None, metadata={"help": "A CLIP vision (or full CLIP) directory."})
    mm_vision_select_layer: int | None = field(
        default=None, metadata={"help": "Vision layer whose features are projected (LLaVA default -1; -2 in LLaVA-1.5)."}
    )
    pretrain_mm_mlp_adapter: str | None = field(
        default=None, metadata={"help": "Projector weights: LLaVA's mm_projector.bin or our mm_projector.safetensors."}
    )
    mm_projector_type: str | None = field(
        default=None,
        metadata={"help": "linear (LLaVA's default), mlp2x_gelu, llamavid, or a method registered with "
                  "llava_voco.model.projectors.register_projector."},
    )
    mm_use_im_start_end: bool = field(default=False, metadata={"help": "Refused when True (see the message)."})
    mm_use_im_patch_token: bool = field(default=False, metadata={"help": "Refused when True (see the message)."})
    mm_patch_merge_type: str = field(default="flat", metadata={"help": "Only 'flat' (LLaVA-1.5)."})
    mm_vision_select_feature: str | None = field(
        default=None, metadata={"help": "patch (drop CLS, LLaVA default) or cls_patch."}
    )
    image_grid_pinpoints: str | None = field(default=None, metadata={"help": "LLaVA-NeXT anyres: refused."})
    unfreeze_mm_vision_tower: bool = field(default=False, metadata={"help": "Train the vision tower too."})
    # ours
    voco_tokens: int | None = field(
        default=None,
        metadata={"help": "VoCo tokens after each image (0 = plain LLaVA). Default: the checkpoint's (0 for LLaVA)."},
    )
    voco_mask_mode: str | None = field(default=None, metadata={"help": "paper (default) or official."})
    voco_mask_in_training: bool = field(
        default=True,
        metadata={"help": "False trains the VoCo paper's lower bound: VoCo tokens in the sequence but no VoCo mask "
                  "(text sees the vision tokens); the saved model still compresses (and is evaluated) with the mask."},
    )
    voco_train_tokens: str | None = field(
        default=None,
        metadata={"help": "Elastic k (docs/design.md §2.7): comma-separated VoCo counts, e.g. 1,2,4,8 with --voco_tokens 8; "
                  "each sample trains with one drawn from them, and the saved model compresses with any of them. "
                  "Default: the checkpoint's set (one count: --voco_tokens)."},
    )
    # distillation against the uncompressed model (docs/design.md §2.4, §2.7; llava_voco.train.distillation)
    voco_distill_weight: float = field(
        default=0.0,
        metadata={"help": "Adds w * KL(teacher || student) over the answer tokens; the teacher sees every vision "
                  "token (the same weights with the VoCo mask off, under no_grad, unless --voco_teacher)."},
    )
    voco_distill_temperature: float = field(default=1.0, metadata={"help": "Temperature of the distillation KL."})
    voco_distill_hidden: float = field(
        default=0.0,
        metadata={"help": "Adds w2 * the mean squared difference of student and teacher hidden states at the text "
                  "positions, per layer (the paper's attention distillation, explicit)."},
    )
    voco_teacher: str | None = field(
        default=None,
        metadata={"help": "A checkpoint directory to distil from (frozen), instead of the same weights with the mask off."},
    )
    attn_implementation: str = field(
        default="sdpa",
        metadata={"help": "The language model's attention backend (docs/design.md §2.5; the table in "
                  "llava_voco.model.attention): sdpa, eager, flex_attention, varlen_reference (the flash-attn varlen "
                  "plan in pure torch), varlen_torch (torch's CUDA varlen kernel), flash_attention_2 (needs pip "
                  "install 'llava-voco[gpu]'), or one registered there."},
    )
    # LLaMA-VID (--mm_projector_type llamavid, set-up (a))
    text_decoder_tokenizer: str | None = field(
        default=None, metadata={"help": "LLaMA-VID: the text decoder's BERT WordPiece tokenizer directory."}
    )
    text_decoder_config: str | None = field(
        default=None,
        metadata={"help": "LLaMA-VID: a JSON file of InstructBlipQFormerConfig fields (default: BERT-base sized)."},
    )
    text_decoder_path: str | None = field(
        default=None,
        metadata={"help": "LLaMA-VID: an InstructBLIP checkpoint whose Q-Former and queries start the text decoder."},
    )
    # LLaMA-VID's defaults are the config's (VoCoLlavaConfig), never written here
    num_query: int = field(
        default=VoCoLlavaConfig.llamavid_num_query, metadata={"help": "LLaMA-VID: learnable queries of the text decoder."}
    )
    compress_type: str = field(
        default=VoCoLlavaConfig.llamavid_compress_type,
        metadata={"help": "LLaMA-VID content tokens of an image: none, mean or grid:g."},
    )
    video_compress_type: str = field(
        default=VoCoLlavaConfig.llamavid_video_compress_type, metadata={"help": "LLaMA-VID content tokens of a video frame."}
    )
    instruction_max_length: int = field(
        default=VoCoLlavaConfig.llamavid_instruction_max_length,
        metadata={"help": "LLaMA-VID: instruction tokens kept (from the end)."},
    )
    freeze_text_decoder: bool = field(default=False, metadata={"help": "LLaMA-VID: keep the text decoder (Q-Former) frozen."})
    frame_chunk: int = field(
        default=VoCoLlavaConfig.frame_chunk, metadata={"help": "Images or frames through the vision tower at once."}
    )
    vision_token_pooling: str = field(
        default=VoCoLlavaConfig.vision_token_pooling,
        metadata={"help": "Average-pool each image's patches before a linear/mlp2x_gelu projector: none, mean "
                  "(1 token per image, the VoCo paper's pooling baseline) or grid:g."},
    )


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    cache_dir: str | None = field(default=None)
    optim: str = field(default="adamw_torch")
    remove_unused_columns: bool = field(default=False)
    freeze_mm_mlp_adapter: bool = field(default=False)
    mpt_attn_impl: str | None = field(default=None, metadata={"help": "MPT models: refused."})
    model_max_length: int = field(default=512, metadata={"help": "Maximum sequence length (tokens)."})
    double_quant: bool | None = field(default=None, metadata={"help": "Only with --bits 4/8: refused."})
    quant_type: str | None = field(default=None, metadata={"help": "Only with --bits 4/8: refused."})
    bits: int = field(default=16, metadata={"help": "16 only: 4/8-bit (QLoRA) needs bitsandbytes on CUDA."})
    lora_enable: bool = False
    lora_r: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_weight_path: str = field(default="", metadata={"help": "Declared but never read by LLaVA: refused."})
    lora_bias: str = "none"
    lora_merge_on_save: bool = field(
        default=True,
        metadata={"help": "Merge LoRA into the weights on save (the output loads with from_pretrained); "
                  "False saves the PEFT adapter instead."},
    )
    mm_projector_lr: float | None = None
    mm_vision_tower_lr: float | None = None
    group_by_modality_length: bool = field(default=False)
    # Names LLaVA's scripts pass that transformers 5 folded into others.
    evaluation_strategy: str | None = field(default=None, metadata={"help": "Alias of --eval_strategy."})
    warmup_ratio: float | None = field(default=None, metadata={"help": "Alias of --warmup_steps given as a ratio in [0, 1)."})

    def __post_init__(self):
        if self.evaluation_strategy is not None:
            self.eval_strategy = self.evaluation_strategy
        if self.warmup_ratio is not None:
            if not 0 <= self.warmup_ratio < 1:
                raise TrainConfigError(f"--warmup_ratio {self.warmup_ratio}: must be in [0, 1)")
            if self.warmup_steps:
                raise TrainConfigError("--warmup_ratio and --warmup_steps: pass one of them")
            self.warmup_steps = self.warmup_ratio
        super().__post_init__()


def build_parser() -> HfArgumentParser:
    return HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))


def parse_args(argv: list[str] | None = None):
    """(ModelArguments, DataArguments, TrainingArguments) from ``argv`` (default: the command line). A value
    the argument classes reject (``--fp16`` with ``--bf16``, an unknown ``--image_aspect_ratio``, ...) is a
    ``TrainConfigError``."""
    try:
        return build_parser().parse_args_into_dataclasses(args=argv)
    except TrainConfigError:
        raise
    except ValueError as error:
        raise TrainConfigError(one_line(str(error))) from error


def one_line(message: str) -> str:
    return " ".join(message.split())


def training_dtype(training_args) -> torch.dtype:
    """The dtype the model is loaded and trained in: bf16 under ``--bf16``, fp16 under ``--fp16`` with DeepSpeed
    (its fp16 mode keeps fp32 master weights), fp32 otherwise. ``--fp16`` without DeepSpeed keeps fp32 weights
    under torch's fp16 autocast: torch AMP's gradient scaler refuses fp16 gradients."""
    if training_args.bf16:
        return torch.bfloat16
    if training_args.fp16 and training_args.deepspeed:
        return torch.float16
    return torch.float32


def vision_attn_implementation(attn_implementation: str) -> str:
    """The vision tower's backend for the LLM's ``attn_implementation`` (the table's; a varlen kernel is a causal
    language-model kernel, so the bidirectional vision tower runs sdpa beside it)."""
    return attention_backend(attn_implementation).vision_implementation


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
    depends on the checkpoint (a saved VoCo count) is checked in ``model_setup.plan_loading``."""
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



__all__ = [
    "SELECT_FEATURE",
    "ModelArguments",
    "NEW_MODEL_PROJECTOR",
    "TrainConfigError",
    "TrainingArguments",
    "build_parser",
    "parse_args",
    "parse_voco_train_tokens",
    "refuse_flags_without_effect",
    "training_dtype",
    "vision_attn_implementation",
]
