"""Step 1 of the recipe, the flags against the directories they name: ``plan_loading`` reads configs,
tokenizers and the small projector file (never a model weight) and returns the ``LoadPlan`` that building
follows, or refuses with a ``TrainConfigError``.

LLaVA's two set-ups: (a) ``--model_name_or_path`` an LLM directory + ``--vision_tower`` a CLIP vision
directory; (b) ``--model_name_or_path`` a full Llava or VoCo-Llava checkpoint (``checkpoint_config``: the
flags checked against its config)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file
from transformers import AutoConfig

from llava_voco import VoCoLlavaConfig
from llava_voco.model.configuration_voco_llava import PROJECTOR_FIELDS, VOCO_FIELDS
from llava_voco.model.projectors import get_projector, llava_projector_state_dict, projector_for

from .arguments import (
    NEW_MODEL_PROJECTOR,
    SELECT_FEATURE,
    ModelArguments,
    TrainConfigError,
    TrainingArguments,
    one_line,
    training_dtype,
    vision_attn_implementation,
)
from .checks import parse_voco_train_tokens


@dataclass
class LoadPlan:
    """What ``plan_loading`` checked and decided; ``build_model_and_processor`` loads by it."""

    dtype: torch.dtype
    attn: str  # the language model's attention backend
    vision_attn: str  # the vision tower's
    checkpoint_config: object | None = None  # set-up (b): the Llava / VoCo-Llava checkpoint's config
    llm_config: object | None = None  # set-up (a): the LLM's config ...
    vision_config: object | None = None  # ... and --vision_tower's (vision part), whichever set-up
    projector_fields: dict = field(default_factory=dict)  # set-up (a): the projector method's config fields
    projector_state: dict | None = None  # --pretrain_mm_mlp_adapter, checked
    voco_train_tokens: list[int] | None = None  # elastic k's counts, checked against the model's k


def plan_loading(model_args: ModelArguments, training_args: TrainingArguments) -> LoadPlan:
    """Every check on the flags against the directories they name, before any weight is read: configs,
    tokenizers and the projector file only. Raises ``TrainConfigError``."""
    cache_dir = training_args.cache_dir
    plan = LoadPlan(
        dtype=training_dtype(training_args),
        attn=model_args.attn_implementation,
        vision_attn=vision_attn_implementation(model_args.attn_implementation),
    )
    config = read_config("--model_name_or_path", model_args.model_name_or_path, cache_dir)
    if model_args.vision_tower is not None:
        tower = read_config("--vision_tower", model_args.vision_tower, cache_dir)
        plan.vision_config = getattr(tower, "vision_config", tower)
    if config.model_type in ("llava", VoCoLlavaConfig.model_type):
        plan.checkpoint_config = config
        projector_config = checkpoint_config(model_args, config, plan.vision_config)
    elif plan.vision_config is None:
        raise TrainConfigError(
            f"--model_name_or_path {model_args.model_name_or_path} is not a Llava checkpoint, so it needs "
            "--vision_tower (a CLIP vision directory) to build one"
        )
    else:
        plan.llm_config = config
        select_feature = model_args.mm_vision_select_feature or "patch"
        if select_feature == "cls_patch" and plan.vision_config.model_type != "clip_vision_model":
            raise TrainConfigError(f"--mm_vision_select_feature cls_patch: {model_args.vision_tower} has no CLS token")
        plan.projector_fields = projector_fields(model_args, plan.vision_config)
        projector_config = new_model_config(model_args, config, plan.vision_config, plan.projector_fields)
    if model_args.pretrain_mm_mlp_adapter:
        plan.projector_state = read_projector_weights(model_args.pretrain_mm_mlp_adapter, projector_config)
    plan.voco_train_tokens = voco_train_tokens(model_args, projector_config)
    return plan


def read_config(flag: str, path: str, cache_dir: str | None = None):
    """The config of a model directory (no weight is read); a directory without one is a TrainConfigError."""
    from llava_voco.model.llamavid_original import is_llamavid_original
    from llava_voco.model.llava_original import is_llava_original

    if is_llava_original(path):
        raise TrainConfigError(
            f"{flag} {path}: a checkpoint in LLaVA's own format (llava_llama / llava_mistral); convert it first: "
            f"python scripts/convert_llava_checkpoint.py {path} OUTPUT_DIR [--vision-tower CLIP_DIR]"
        )
    if is_llamavid_original(path):
        raise TrainConfigError(
            f"{flag} {path}: a checkpoint in LLaMA-VID's own format (bert_type, vlm_att_*); convert it first: python "
            f"scripts/convert_llamavid_checkpoint.py {path} OUTPUT_DIR --bert-tokenizer BERT_DIR [--vision-tower eva_vit_g.pth]"
        )
    try:
        return AutoConfig.from_pretrained(path, cache_dir=cache_dir)
    except (OSError, ValueError) as error:
        raise TrainConfigError(f"{flag} {path}: {one_line(str(error))}") from None


def read_projector_weights(path: str, config: VoCoLlavaConfig) -> dict[str, torch.Tensor]:
    """``--pretrain_mm_mlp_adapter``: LLaVA's mm_projector.bin (read with weights_only=True) or safetensors,
    keyed relative to our projector and checked against the projector ``config`` builds (on the meta device:
    shapes only), before the model is loaded."""
    flag = f"--pretrain_mm_mlp_adapter {path}"
    if not os.path.isfile(path):
        raise TrainConfigError(f"{flag}: no such file")
    try:
        if path.endswith(".safetensors"):
            state_dict = load_file(path)
        else:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file is the flag's problem
        raise TrainConfigError(f"{flag}: unreadable ({one_line(str(error))[:300]})") from None
    try:
        state_dict = llava_projector_state_dict(state_dict, config.mm_projector_type, source=path)
    except ValueError as error:
        raise TrainConfigError(one_line(str(error))) from None
    with torch.device("meta"):
        projector = projector_for(config).build(config)
    expected = {name: tuple(p.shape) for name, p in projector.state_dict().items()}
    got = {name: tuple(t.shape) for name, t in state_dict.items()}
    if expected != got:
        raise TrainConfigError(
            f"{flag}: holds {got}, the {config.mm_projector_type} projector of this model needs {expected} "
            "(another --mm_projector_type, vision tower or LLM?)"
        )
    return state_dict


def new_model_config(model_args: ModelArguments, llm_config, vision_config, projector_fields: dict,
                     **token_fields) -> VoCoLlavaConfig:
    """Set-up (a)'s config, from the flags, the LLM's config and the vision tower's: the plan checks the projector
    file against it (before loading), building builds the model with it (``token_fields``: the ids and VoCo
    fields the tokenizer gives once ``<image>`` and ``<voco>`` are added)."""
    select_layer = model_args.mm_vision_select_layer
    return VoCoLlavaConfig(
        vision_config=vision_config.to_dict(),
        text_config=llm_config.to_dict(),
        vision_feature_layer=select_layer if select_layer is not None else -1,
        vision_feature_select_strategy=SELECT_FEATURE[model_args.mm_vision_select_feature or "patch"],
        mm_projector_type=model_args.mm_projector_type or NEW_MODEL_PROJECTOR,
        vision_token_pooling=model_args.vision_token_pooling,
        frame_chunk=model_args.frame_chunk,
        **projector_fields,
        **token_fields,
    )


def voco_train_tokens(model_args: ModelArguments, config) -> list[int] | None:
    """The VoCo counts samples are drawn from (elastic k): ``--voco_train_tokens``, else a saved elastic
    checkpoint's set; None for one count. Raises ``TrainConfigError`` when the largest is not the model's k."""
    voco_tokens = model_args.voco_tokens if model_args.voco_tokens is not None else getattr(config, "voco_tokens", 0)
    if model_args.voco_train_tokens is None:
        return getattr(config, "voco_train_tokens", None) if voco_tokens else None
    counts = parse_voco_train_tokens(model_args.voco_train_tokens)
    if not voco_tokens or counts[-1] != voco_tokens:
        raise TrainConfigError(
            f"--voco_train_tokens {model_args.voco_train_tokens}: its largest count must be the model's VoCo "
            f"tokens ({voco_tokens}{', from ' + model_args.model_name_or_path if model_args.voco_tokens is None else ''})"
        )
    return counts


def projector_fields(model_args: ModelArguments, vision_config=None) -> dict:
    """The config fields the projector method takes from its flags (set-up (a)), checked from configs and
    tokenizers only (LLaMA-VID: its text decoder's); ``vision_config``: the vision tower's."""
    try:
        method = get_projector(model_args.mm_projector_type or NEW_MODEL_PROJECTOR)
        return method.config_fields_from_flags(model_args, vision_config)
    except ValueError as error:
        raise TrainConfigError(one_line(str(error))) from None


# Vision config fields that decide the weights' shapes and the tokens an image becomes.
VISION_SHAPE_FIELDS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                       "image_size", "patch_size", "num_channels")


def checkpoint_config(model_args: ModelArguments, saved, vision_config=None) -> VoCoLlavaConfig:
    """Set-up (b), before loading: the flags checked against the checkpoint's config ``saved`` (and
    ``--vision_tower``'s ``vision_config``), and the VoCoLlavaConfig the checkpoint is loaded with."""
    path = model_args.model_name_or_path
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
    if model_args.mm_vision_select_feature is not None:
        strategy = SELECT_FEATURE[model_args.mm_vision_select_feature]
        if strategy != saved.vision_feature_select_strategy:
            raise TrainConfigError(
                f"--mm_vision_select_feature {model_args.mm_vision_select_feature}: {path} was trained with "
                f"vision_feature_select_strategy={saved.vision_feature_select_strategy}; changing it changes "
                "the number of image tokens"
            )
    if vision_config is not None:
        # LLaVA loads the vision tower's weights from --vision_tower: they must fit the checkpoint's tower.
        differing = [f"{name}: {getattr(vision_config, name, None)} (--vision_tower) vs "
                     f"{getattr(saved.vision_config, name, None)} ({path})"
                     for name in VISION_SHAPE_FIELDS
                     if getattr(vision_config, name, None) != getattr(saved.vision_config, name, None)]
        if differing:
            raise TrainConfigError(
                f"--vision_tower {model_args.vision_tower}: does not match the vision tower of {path} "
                f"({'; '.join(differing)})"
            )

    values = {k: v for k, v in saved.to_dict().items() if k not in ("model_type", "architectures", *VOCO_FIELDS)}
    # the projector the checkpoint was built with, all its settings (LLaMA-VID's text decoder, ...)
    values.update({name: getattr(saved, name) for name in PROJECTOR_FIELDS if hasattr(saved, name)})
    if saved_voco:
        values.update(voco_tokens=saved_voco, voco_token_id=saved.voco_token_id, voco_mask_mode=saved_mode,
                      voco_train_tokens=getattr(saved, "voco_train_tokens", None))
    config = VoCoLlavaConfig(**values)
    config.architectures = ["VoCoLlavaForConditionalGeneration"]
    return config
