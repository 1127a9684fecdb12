"""Train a LLaVA model like LLaVA does, with one more flag: ``--voco_tokens k``.

    python -m llava_voco.train --model_name_or_path ... --version v1 --data_path ... --image_folder ...
        --vision_tower ... --mm_projector_type mlp2x_gelu ... --voco_tokens 1 --report_to wandb
    deepspeed llava_voco/train/train.py --deepspeed scripts/zero2.json ...      (several processes)

LLaVA's flags are accepted verbatim. A flag that LLaVA accepts but that would have no effect here is
refused with a message saying why (``refuse_flags_without_effect``), never silently ignored.

Read top to bottom, the recipe is:
  1. parse the three argument groups (model, data, training) with ``HfArgumentParser``;
  2. refuse flags without effect and contradictory stages;
  3. build the model and processor, one of LLaVA's two ways:
     (a) ``--model_name_or_path`` an LLM directory + ``--vision_tower`` a CLIP vision directory: a new
         ``VoCoLlavaForConditionalGeneration`` holding both, the projector from ``--mm_projector_type``
         (optionally loaded from ``--pretrain_mm_mlp_adapter``), ``<image>`` (and ``<voco>``) added to
         the tokenizer;
     (b) ``--model_name_or_path`` a full Llava or VoCo-Llava checkpoint; ``--voco_tokens k`` on a plain
         Llava checkpoint adds VoCo as ``llava_voco.add_voco_to_llava`` does (the VoCo finetune stage);
  4. choose what trains (the stage): pretrain (``--tune_mm_mlp_adapter``: the projector only),
     finetune (LLM + projector; the vision tower only with ``--unfreeze_mm_vision_tower``),
     ``--freeze_backbone``, ``--freeze_mm_mlp_adapter``, LoRA (``--lora_enable``, through PEFT);
  5. the data (``llava_voco.train.data``): LLaVA's JSON, templates, truncation and collator;
  6. the Trainer (``VoCoLlavaTrainer``: LLaVA's sampler, projector learning rate, projector saving),
     resuming from the last ``checkpoint-*`` in ``--output_dir`` as LLaVA does (or from
     ``--resume_from_checkpoint``);
  7. save: a directory that loads with ``from_pretrained`` (after ``import llava_voco``), with its
     processor; the pretrain stage also writes ``mm_projector.safetensors`` for the next stage's
     ``--pretrain_mm_mlp_adapter``; LoRA is merged into the weights on save (``--lora_merge_on_save``).
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a file (``deepspeed llava_voco/train/train.py``), as LLaVA's scripts do
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    __package__ = "llava_voco.train"

import torch
import transformers
from safetensors.torch import load_file
from transformers import (
    AddedToken,
    AutoConfig,
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoTokenizer,
    HfArgumentParser,
    set_seed,
)
from transformers.integrations.deepspeed import (
    is_deepspeed_zero3_enabled,
    set_hf_deepspeed_config,
    unset_hf_deepspeed_config,
)
from transformers.models.auto.modeling_auto import MODEL_MAPPING

from llava_voco import VOCO_TOKEN, VoCoLlavaConfig, VoCoLlavaForConditionalGeneration, VoCoLlavaProcessor
from llava_voco.model.configuration_voco_llava import VOCO_FIELDS
from llava_voco.model.projector import PROJECTOR_TYPES, build_projector, llava_projector_state_dict

from .data import DataArguments, make_supervised_data_module
from .trainer import CompressionStats, VoCoLlavaTrainer

logger = logging.getLogger("llava_voco.train")

IMAGE_TOKEN = "<image>"
# LLaVA's --mm_vision_select_feature -> transformers' vision_feature_select_strategy.
SELECT_FEATURE = {"patch": "default", "cls_patch": "full"}


class TrainConfigError(ValueError):
    """A command line that cannot train as asked; the message says which flag and why."""


# ---------------------------------------------------------------------------------------------------
# 1. Arguments: LLaVA's names, types and meanings. Defaults that LLaVA sets to values we cannot honour
#    (or that depend on the checkpoint) are None here and resolved in `build_model_and_processor`.
# ---------------------------------------------------------------------------------------------------
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
        default=None, metadata={"help": f"One of {', '.join(PROJECTOR_TYPES)} (LLaVA default linear)."}
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
    attn_implementation: str = field(default="sdpa", metadata={"help": "sdpa, eager or flex_attention."})
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
    num_query: int = field(default=32, metadata={"help": "LLaMA-VID: learnable queries of the text decoder."})
    compress_type: str = field(default="grid:2", metadata={"help": "LLaMA-VID content tokens of an image: none, mean or grid:g."})
    video_compress_type: str = field(default="mean", metadata={"help": "LLaMA-VID content tokens of a video frame."})
    instruction_max_length: int = field(default=128, metadata={"help": "LLaMA-VID: instruction tokens kept (from the end)."})
    freeze_text_decoder: bool = field(default=False, metadata={"help": "LLaMA-VID: keep the text decoder (Q-Former) frozen."})
    frame_chunk: int = field(default=64, metadata={"help": "Images or frames through the vision tower at once."})
    vision_token_pooling: str = field(
        default="none",
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
    """(ModelArguments, DataArguments, TrainingArguments) from ``argv`` (default: the command line)."""
    return build_parser().parse_args_into_dataclasses(args=argv)


# ---------------------------------------------------------------------------------------------------
# 2. Flags accepted for LLaVA compatibility that would do nothing here, and contradictory stages.
# ---------------------------------------------------------------------------------------------------
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
    if model_args.mm_projector_type != "llamavid":
        for flag, default in (("text_decoder_tokenizer", None), ("text_decoder_config", None),
                              ("text_decoder_path", None), ("num_query", 32),
                              ("compress_type", "grid:2"), ("video_compress_type", "mean"),
                              ("freeze_text_decoder", False), ("instruction_max_length", 128)):
            if getattr(model_args, flag) != default:
                refuse(f"--{flag} {getattr(model_args, flag)}", "it only applies with --mm_projector_type llamavid")
    if model_args.vision_token_pooling != "none":
        from llava_voco.model.llamavid import CompressTypeError, parse_compress_type

        if model_args.mm_projector_type == "llamavid":
            refuse(f"--vision_token_pooling {model_args.vision_token_pooling}",
                   "LLaMA-VID pools its content tokens with --compress_type / --video_compress_type")
        try:
            parse_compress_type(model_args.vision_token_pooling)
        except CompressTypeError as error:
            refuse(f"--vision_token_pooling {model_args.vision_token_pooling}", str(error))
    if model_args.mm_projector_type is not None and model_args.mm_projector_type not in PROJECTOR_TYPES:
        refuse(f"--mm_projector_type {model_args.mm_projector_type}", f"supported: {', '.join(PROJECTOR_TYPES)}")
    if model_args.mm_vision_select_feature is not None and model_args.mm_vision_select_feature not in SELECT_FEATURE:
        refuse(f"--mm_vision_select_feature {model_args.mm_vision_select_feature}", "must be patch or cls_patch")
    if not model_args.voco_mask_in_training and not model_args.voco_tokens:
        refuse("--voco_mask_in_training False", "only means something with --voco_tokens k > 0")
    if model_args.voco_tokens is not None and model_args.voco_tokens < 0:
        refuse(f"--voco_tokens {model_args.voco_tokens}", "must be >= 0")
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


# ---------------------------------------------------------------------------------------------------
# 3. Model and processor.
# ---------------------------------------------------------------------------------------------------
def is_llava_checkpoint(path: str, cache_dir: str | None = None) -> bool:
    return AutoConfig.from_pretrained(path, cache_dir=cache_dir).model_type in ("llava", VoCoLlavaConfig.model_type)


def add_tokens_with_mean_rows(tokenizer, model, tokens: list[str]) -> None:
    """Add ``tokens`` as special tokens if absent; their new embedding (and untied lm_head) rows start at
    the mean of the existing rows, as ``add_voco_to_llava`` and LLaVA's token resizing do."""
    missing = [t for t in tokens if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)]
    if not missing:
        return
    known = len(tokenizer)
    tokenizer.add_special_tokens(
        {"extra_special_tokens": [AddedToken(t, special=True, normalized=False) for t in missing]},
        replace_extra_special_tokens=False,
    )
    new_ids = tokenizer.convert_tokens_to_ids(missing)
    if max(new_ids) >= model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(max(new_ids) + 1, mean_resizing=False)
    weights = list({model.get_input_embeddings().weight, model.get_output_embeddings().weight})
    with gathered(weights):  # whole rows under ZeRO-3; rank 0's values are broadcast on exit
        with torch.no_grad():
            for weight in weights:
                weight[new_ids] = weight[:known].mean(dim=0)


@contextlib.contextmanager
def zero3_context_off(training_args):
    ds_config = getattr(training_args, "hf_deepspeed_config", None)
    if ds_config is None or not is_deepspeed_zero3_enabled():
        yield
        return
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(ds_config)


def gathered(params):
    """Under DeepSpeed ZeRO-3, the full parameters (modified on rank 0, then re-partitioned)."""
    if is_deepspeed_zero3_enabled():
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=0)
    return contextlib.nullcontext()


def load_vision_tower(path: str, cache_dir: str | None, attn_implementation: str):
    config = AutoConfig.from_pretrained(path, cache_dir=cache_dir)
    vision_config = getattr(config, "vision_config", config)  # a full CLIP checkpoint holds its vision config
    model_class = MODEL_MAPPING[type(vision_config)]
    return model_class.from_pretrained(
        path, config=vision_config, cache_dir=cache_dir, attn_implementation=attn_implementation
    )


def load_projector_weights(model: VoCoLlavaForConditionalGeneration, path: str) -> None:
    """``--pretrain_mm_mlp_adapter``: LLaVA's mm_projector.bin (read with weights_only=True) or safetensors."""
    if not os.path.isfile(path):
        raise TrainConfigError(f"--pretrain_mm_mlp_adapter {path}: no such file")
    if path.endswith(".safetensors"):
        state_dict = load_file(path)
    else:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    state_dict = llava_projector_state_dict(state_dict, model.config.mm_projector_type, source=path)
    projector = model.model.multi_modal_projector
    with gathered(list(projector.parameters())):
        expected = {name: tuple(p.shape) for name, p in projector.state_dict().items()}
        got = {name: tuple(t.shape) for name, t in state_dict.items()}
        if expected != got:
            raise TrainConfigError(
                f"--pretrain_mm_mlp_adapter {path}: holds {got}, the {model.config.mm_projector_type} projector of "
                f"this model needs {expected} (another --mm_projector_type, vision tower or LLM?)"
            )
        projector.load_state_dict(state_dict)
    logger.info("loaded the projector from %s", path)


def build_from_llm_and_vision_tower(model_args: ModelArguments, training_args: TrainingArguments):
    """Set-up (a): a new VoCo-Llava from an LLM directory and a vision tower directory."""
    cache_dir, attn = training_args.cache_dir, model_args.attn_implementation
    voco_tokens = model_args.voco_tokens or 0
    tokenizer = AutoTokenizer.from_pretrained(
        model_args.model_name_or_path, cache_dir=cache_dir, model_max_length=training_args.model_max_length,
        padding_side="right",
    )
    image_processor = AutoImageProcessor.from_pretrained(model_args.vision_tower, cache_dir=cache_dir)
    llm = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, cache_dir=cache_dir, attn_implementation=attn)
    vision_tower = load_vision_tower(model_args.vision_tower, cache_dir, attn)

    if tokenizer.pad_token is None:  # LLaVA pads with unk (v1 templates)
        if tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            add_tokens_with_mean_rows(tokenizer, llm, ["<pad>"])
            tokenizer.pad_token = "<pad>"
    add_tokens_with_mean_rows(tokenizer, llm, [IMAGE_TOKEN] + ([VOCO_TOKEN] if voco_tokens else []))

    vision_config = vision_tower.config
    select_feature = model_args.mm_vision_select_feature or "patch"
    strategy = SELECT_FEATURE[select_feature]
    has_cls = vision_config.model_type == "clip_vision_model"
    if select_feature == "cls_patch" and not has_cls:
        raise TrainConfigError(f"--mm_vision_select_feature cls_patch: {model_args.vision_tower} has no CLS token")
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    image_tokens = patches + (1 if strategy == "full" else 0)
    if model_args.vision_token_pooling != "none":
        from llava_voco.model.llamavid import content_tokens_per_frame

        image_tokens = content_tokens_per_frame(model_args.vision_token_pooling, image_tokens)
    config = VoCoLlavaConfig(
        vision_config=vision_config.to_dict(),
        text_config=llm.config.to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=image_tokens,
        vision_feature_layer=model_args.mm_vision_select_layer if model_args.mm_vision_select_layer is not None else -1,
        vision_feature_select_strategy=strategy,
        tie_word_embeddings=llm.config.tie_word_embeddings,
        mm_projector_type=model_args.mm_projector_type or "linear",
        voco_tokens=voco_tokens,
        voco_token_id=tokenizer.convert_tokens_to_ids(VOCO_TOKEN) if voco_tokens else None,
        voco_mask_mode=model_args.voco_mask_mode or "paper",
        frame_chunk=model_args.frame_chunk,
        vision_token_pooling=model_args.vision_token_pooling,
        **llamavid_fields(model_args),
    )
    config.architectures = ["VoCoLlavaForConditionalGeneration"]
    config._attn_implementation = attn
    # The shell is built on the meta device (no memory, no init), then the loaded parts are put in it.
    # (Outside DeepSpeed's ZeRO-3 context, which would try to initialise the meta weights; the loaded
    # parts are partitioned already, the projector is when the engine starts.)
    with torch.device("meta"), zero3_context_off(training_args):
        model = VoCoLlavaForConditionalGeneration(config)
    model.model.language_model = llm.model
    model.lm_head = llm.lm_head
    model.model.vision_tower = vision_tower
    model.model.multi_modal_projector = build_projector(config)  # nn.Linear's own init, as LLaVA's projector
    if model_args.text_decoder_path is not None:
        from llava_voco.model.llamavid import load_text_decoder_from_instructblip

        try:
            load_text_decoder_from_instructblip(model.model.multi_modal_projector, model_args.text_decoder_path)
        except (ValueError, FileNotFoundError) as error:
            raise TrainConfigError(f"--text_decoder_path: {error}") from None
    model.config.text_config = llm.config
    model.config.vision_config = vision_config
    on_meta = [name for name, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if on_meta:
        raise RuntimeError(f"parameters left uninitialised while assembling the model: {on_meta[:5]}")

    processor = VoCoLlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=1 if has_cls else 0,
        chat_template=tokenizer.chat_template,
        voco_tokens=voco_tokens,
        llamavid_compress_type=config.llamavid_compress_type if config.mm_projector_type == "llamavid" else None,
        llamavid_video_compress_type=config.llamavid_video_compress_type if config.mm_projector_type == "llamavid" else None,
        instruction_max_length=model_args.instruction_max_length,
        vision_token_pooling=model_args.vision_token_pooling,
    )
    if config.mm_projector_type == "llamavid":
        processor.text_decoder_tokenizer = AutoTokenizer.from_pretrained(model_args.text_decoder_tokenizer)
    return model, processor


def llamavid_fields(model_args: ModelArguments) -> dict:
    """The config fields of LLaMA-VID's projector from its flags (set-up (a))."""
    if model_args.mm_projector_type != "llamavid":
        return {}
    if model_args.text_decoder_tokenizer is None:
        raise TrainConfigError("--mm_projector_type llamavid needs --text_decoder_tokenizer (a BERT tokenizer directory)")
    qformer = {}
    if model_args.text_decoder_path is not None and model_args.text_decoder_config is None:
        from transformers import InstructBlipConfig

        qformer = InstructBlipConfig.from_pretrained(model_args.text_decoder_path).qformer_config.to_dict()
        for key in ("model_type", "encoder_hidden_size", "transformers_version", "architectures"):
            qformer.pop(key, None)
    if model_args.text_decoder_config is not None:
        try:
            qformer = json.loads(Path(model_args.text_decoder_config).read_text())
        except (OSError, ValueError) as error:
            raise TrainConfigError(f"--text_decoder_config {model_args.text_decoder_config}: {error}") from None
    vocab = len(AutoTokenizer.from_pretrained(model_args.text_decoder_tokenizer))
    if qformer.get("vocab_size", vocab) < vocab:
        raise TrainConfigError(f"--text_decoder_config vocab_size {qformer['vocab_size']} < the tokenizer's {vocab}")
    qformer.setdefault("vocab_size", vocab)
    return {
        "llamavid_num_query": model_args.num_query,
        "llamavid_qformer": qformer,
        "llamavid_compress_type": model_args.compress_type,
        "llamavid_video_compress_type": model_args.video_compress_type,
    }


def build_from_llava_checkpoint(model_args: ModelArguments, training_args: TrainingArguments):
    """Set-up (b): a full Llava or VoCo-Llava checkpoint (transformers format)."""
    path, attn = model_args.model_name_or_path, model_args.attn_implementation
    saved = AutoConfig.from_pretrained(path, cache_dir=training_args.cache_dir)
    saved_voco = getattr(saved, "voco_tokens", 0)
    voco_tokens = model_args.voco_tokens if model_args.voco_tokens is not None else saved_voco
    if saved_voco and voco_tokens != saved_voco:
        raise TrainConfigError(
            f"--voco_tokens {voco_tokens}: {path} was saved with voco_tokens={saved_voco}; training it with another "
            f"number would change what its VoCo tokens mean. Drop the flag (or pass {saved_voco}), or start from "
            "the plain Llava checkpoint to train another number"
        )
    saved_type = getattr(saved, "mm_projector_type", "mlp2x_gelu")
    if model_args.mm_projector_type is not None and model_args.mm_projector_type != saved_type:
        raise TrainConfigError(
            f"--mm_projector_type {model_args.mm_projector_type}: {path} has a {saved_type} projector; the flag "
            "only chooses the projector of a model built from an LLM and a vision tower"
        )
    saved_pooling = getattr(saved, "vision_token_pooling", "none")
    if model_args.vision_token_pooling != "none" and model_args.vision_token_pooling != saved_pooling:
        raise TrainConfigError(
            f"--vision_token_pooling {model_args.vision_token_pooling}: {path} was built with "
            f"vision_token_pooling={saved_pooling}; the flag only applies to a model built from an LLM and a vision tower"
        )
    saved_mode = getattr(saved, "voco_mask_mode", "paper")
    if saved_voco and model_args.voco_mask_mode is not None and model_args.voco_mask_mode != saved_mode:
        raise TrainConfigError(
            f"--voco_mask_mode {model_args.voco_mask_mode}: {path} was trained with voco_mask_mode={saved_mode}"
        )

    values = {k: v for k, v in saved.to_dict().items() if k not in ("model_type", "architectures", *VOCO_FIELDS)}
    values["mm_projector_type"] = saved_type
    values["vision_token_pooling"] = saved_pooling
    if saved_voco:
        values.update(voco_tokens=saved_voco, voco_token_id=saved.voco_token_id, voco_mask_mode=saved_mode)
    config = VoCoLlavaConfig(**values)
    config.architectures = ["VoCoLlavaForConditionalGeneration"]
    model = VoCoLlavaForConditionalGeneration.from_pretrained(
        path, config=config, attn_implementation=attn, cache_dir=training_args.cache_dir
    )
    processor = transformers.AutoProcessor.from_pretrained(path, cache_dir=training_args.cache_dir)
    if voco_tokens and not saved_voco:
        # The VoCo finetune stage, as llava_voco.add_voco_to_llava does it: <voco> added as a special
        # token, its embedding (and lm_head) row at the mean of the existing rows.
        add_tokens_with_mean_rows(processor.tokenizer, model, [VOCO_TOKEN])
        model.config.voco_tokens = voco_tokens
        model.config.voco_token_id = processor.tokenizer.convert_tokens_to_ids(VOCO_TOKEN)
        model.config.voco_mask_mode = model_args.voco_mask_mode or "paper"
    processor = rebuild_processor(processor, voco_tokens)
    processor.tokenizer.model_max_length = training_args.model_max_length

    # LLaVA applies these flags to a full checkpoint too.
    if model_args.mm_vision_select_layer is not None and model_args.mm_vision_select_layer != model.config.vision_feature_layer:
        logger.warning("--mm_vision_select_layer %s replaces the checkpoint's vision_feature_layer %s",
                       model_args.mm_vision_select_layer, model.config.vision_feature_layer)
        model.config.vision_feature_layer = model_args.mm_vision_select_layer
    if model_args.mm_vision_select_feature is not None:
        strategy = SELECT_FEATURE[model_args.mm_vision_select_feature]
        if strategy != model.config.vision_feature_select_strategy:
            raise TrainConfigError(
                f"--mm_vision_select_feature {model_args.mm_vision_select_feature}: {path} was trained with "
                f"vision_feature_select_strategy={model.config.vision_feature_select_strategy}; changing it changes "
                "the number of image tokens"
            )
    if model_args.vision_tower is not None:
        # LLaVA loads the vision tower's weights from --vision_tower, whatever the checkpoint holds.
        with zero3_context_off(training_args):  # whole weights to copy from
            tower = load_vision_tower(model_args.vision_tower, training_args.cache_dir, attn)
        ours = model.model.vision_tower
        with gathered(list(ours.parameters())):
            theirs, mine = tower.state_dict(), ours.state_dict()
            differing = sorted(set(theirs) ^ set(mine)) + [n for n in theirs if n in mine and theirs[n].shape != mine[n].shape]
            if differing:
                raise TrainConfigError(
                    f"--vision_tower {model_args.vision_tower}: does not match the vision tower of {path} "
                    f"(differing weights: {differing[:5]})"
                )
            ours.load_state_dict(theirs)
        logger.info("vision tower weights loaded from %s", model_args.vision_tower)
    return model, processor


def rebuild_processor(processor, voco_tokens: int) -> VoCoLlavaProcessor:
    return VoCoLlavaProcessor.from_llava_processor(processor, voco_tokens)


def build_model_and_processor(model_args: ModelArguments, training_args: TrainingArguments):
    if is_llava_checkpoint(model_args.model_name_or_path, training_args.cache_dir):
        model, processor = build_from_llava_checkpoint(model_args, training_args)
    elif model_args.vision_tower is None:
        raise TrainConfigError(
            f"--model_name_or_path {model_args.model_name_or_path} is not a Llava checkpoint, so it needs "
            "--vision_tower (a CLIP vision directory) to build one"
        )
    else:
        model, processor = build_from_llm_and_vision_tower(model_args, training_args)
    if model_args.pretrain_mm_mlp_adapter:
        load_projector_weights(model, model_args.pretrain_mm_mlp_adapter)
    model.config.text_config.use_cache = False  # training; set back on save
    return model, processor


# ---------------------------------------------------------------------------------------------------
# 4. What trains.
# ---------------------------------------------------------------------------------------------------
def lora_target_modules(model) -> list[str]:
    """Every nn.Linear of the language model (not the projector, the vision tower or lm_head), by name."""
    names = set()
    for name, module in model.model.language_model.named_modules():
        if isinstance(module, torch.nn.Linear):
            names.add(name.split(".")[-1])
    return sorted(names)


def set_trainable(model, model_args: ModelArguments, training_args: TrainingArguments):
    """Returns the model to train (a PEFT model with --lora_enable)."""
    model.requires_grad_(True)
    if model_args.tune_mm_mlp_adapter:
        model.requires_grad_(False)
        model.model.multi_modal_projector.requires_grad_(True)
    if model_args.freeze_backbone:
        model.model.language_model.requires_grad_(False)
    if not model_args.unfreeze_mm_vision_tower:
        model.model.vision_tower.requires_grad_(False)
    if training_args.freeze_mm_mlp_adapter:
        model.model.multi_modal_projector.requires_grad_(False)
    if model_args.freeze_text_decoder and model.config.mm_projector_type == "llamavid":
        model.model.multi_modal_projector.text_decoder.requires_grad_(False)

    if training_args.lora_enable:
        from peft import LoraConfig, get_peft_model

        modules_to_save = []
        if not training_args.freeze_mm_mlp_adapter:
            modules_to_save.append("multi_modal_projector")
        if model_args.unfreeze_mm_vision_tower:
            modules_to_save.append("vision_tower")
        lora_config = LoraConfig(
            r=training_args.lora_r,
            lora_alpha=training_args.lora_alpha,
            lora_dropout=training_args.lora_dropout,
            bias=training_args.lora_bias,
            # A regex on full names keeps LoRA inside the language model.
            target_modules=r".*language_model.*\.(" + "|".join(map(re.escape, lora_target_modules(model))) + r")",
            modules_to_save=modules_to_save or None,
        )
        model = get_peft_model(model, lora_config)

    if training_args.gradient_checkpointing:
        model.enable_input_require_grads()  # frozen embeddings would otherwise cut the graph, as in LLaVA
    def numel(p):
        return getattr(p, "ds_numel", p.numel())  # ZeRO-3 partitions hold only a slice

    trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(numel(p) for p in model.parameters())
    logger.info("trainable parameters: %d of %d (%.2f%%)", trainable, total, 100.0 * trainable / max(total, 1))
    return model


# ---------------------------------------------------------------------------------------------------
# 7. Saving.
# ---------------------------------------------------------------------------------------------------
def save_lora(trainer: VoCoLlavaTrainer, processor, output_dir: str, merge: bool) -> None:
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


# ---------------------------------------------------------------------------------------------------
# The recipe.
# ---------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> VoCoLlavaTrainer:
    model_args, data_args, training_args = parse_args(argv)
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if training_args.should_log else logging.WARNING,
    )
    refuse_flags_without_effect(model_args, data_args, training_args)
    # The process group first: under ZeRO-3 the weights are partitioned as they load.
    training_args.device
    if training_args.deepspeed:
        import deepspeed

        deepspeed.init_distributed()  # adopts torch's group (the CPU path of TrainingArguments leaves it out)
    set_seed(training_args.seed)

    model, processor = build_model_and_processor(model_args, training_args)
    logger.info(
        "model: %s projector, voco_tokens=%d (%s mask), %d image tokens per image",
        model.config.mm_projector_type, model.config.voco_tokens, model.config.voco_mask_mode,
        model.config.image_seq_length,
    )
    model.model.apply_voco_mask = model_args.voco_mask_in_training
    model = set_trainable(model, model_args, training_args)

    data_module = make_supervised_data_module(
        processor, data_args, version=model_args.version, model_max_length=training_args.model_max_length,
        vision_hidden_size=model.config.vision_config.hidden_size,  # features files of another width: named error
    )
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
        blank_image_for_text_batches=is_deepspeed_zero3_enabled(),
        **data_module,
    )

    resume = training_args.resume_from_checkpoint
    if resume is None and os.path.isdir(training_args.output_dir):
        resume = last_checkpoint(training_args.output_dir)  # LLaVA resumes from output_dir's checkpoints
    if resume:
        logger.info("resuming from %s", resume)
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_state()

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


def skipped_before_training(dataset) -> int:
    """Samples the dataset dropped when it checked the file up front (``--lazy_preprocess False``)."""
    samples = getattr(dataset, "samples", None)
    return len(samples) - len(dataset) if samples is not None else 0


def cli(argv: list[str] | None = None) -> int:
    try:
        main(argv)
    except TrainConfigError as error:
        print(f"llava-voco-train: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
