"""The model and processor the training entry starts from, in one of LLaVA's two set-ups, and what trains.

(a) ``--model_name_or_path`` an LLM directory + ``--vision_tower`` a CLIP vision directory: a new
    ``VoCoLlavaForConditionalGeneration`` holding both, the projector from ``--mm_projector_type``
    (optionally loaded from ``--pretrain_mm_mlp_adapter``), ``<image>`` (and ``<voco>``) added to the
    tokenizer (``build_from_llm_and_vision_tower``);
(b) ``--model_name_or_path`` a full Llava or VoCo-Llava checkpoint; ``--voco_tokens k`` on a plain Llava
    checkpoint adds VoCo as ``llava_voco.add_voco_to_llava`` does, the VoCo finetune stage
    (``build_from_llava_checkpoint``).

Everything here works under DeepSpeed ZeRO-3, whose weights are partitioned as they load: whole weights
are gathered where they are read or written (``gathered``), and parts assembled by hand are built outside
ZeRO-3's init context (``zero3_context_off``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file
from transformers import AutoConfig, AutoImageProcessor, AutoModelForCausalLM, AutoTokenizer
from transformers.integrations.deepspeed import (
    is_deepspeed_zero3_enabled,
    set_hf_deepspeed_config,
    unset_hf_deepspeed_config,
)
from transformers.models.auto.modeling_auto import MODEL_MAPPING

from llava_voco import VoCoLlavaConfig, VoCoLlavaForConditionalGeneration, VoCoLlavaProcessor
from llava_voco.constants import IMAGE_PLACEHOLDER, VOCO_TOKEN
from llava_voco.model.builder import add_special_tokens_with_mean_rows, gathered
from llava_voco.model.configuration_voco_llava import VOCO_FIELDS
from llava_voco.model.image_inputs import tokens_per_image
from llava_voco.model.projector import build_projector, llava_projector_state_dict

from .arguments import SELECT_FEATURE, ModelArguments, TrainConfigError, TrainingArguments

logger = logging.getLogger("llava_voco.train")


def is_llava_checkpoint(path: str, cache_dir: str | None = None) -> bool:
    return AutoConfig.from_pretrained(path, cache_dir=cache_dir).model_type in ("llava", VoCoLlavaConfig.model_type)


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
            add_special_tokens_with_mean_rows(tokenizer, llm, ["<pad>"])
            tokenizer.pad_token = "<pad>"
    add_special_tokens_with_mean_rows(tokenizer, llm, [IMAGE_PLACEHOLDER] + ([VOCO_TOKEN] if voco_tokens else []))

    vision_config = vision_tower.config
    select_feature = model_args.mm_vision_select_feature or "patch"
    strategy = SELECT_FEATURE[select_feature]
    has_cls = vision_config.model_type == "clip_vision_model"
    if select_feature == "cls_patch" and not has_cls:
        raise TrainConfigError(f"--mm_vision_select_feature cls_patch: {model_args.vision_tower} has no CLS token")
    config = VoCoLlavaConfig(
        vision_config=vision_config.to_dict(),
        text_config=llm.config.to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER),
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
    config.image_seq_length = tokens_per_image(config).image  # tokens one image becomes, VoCo tokens aside
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
        # The VoCo finetune stage, as llava_voco.add_voco_to_llava does it.
        add_special_tokens_with_mean_rows(processor.tokenizer, model, [VOCO_TOKEN])
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
