"""The model and processor the training entry starts from, in one of LLaVA's two set-ups, and what trains.

(a) ``--model_name_or_path`` an LLM directory + ``--vision_tower`` a CLIP vision directory: a new
    ``VoCoLlavaForConditionalGeneration`` holding both, the projector from ``--mm_projector_type``
    (optionally loaded from ``--pretrain_mm_mlp_adapter``), ``<image>`` (and ``<voco>``) added to the
    tokenizer (``build_from_llm_and_vision_tower``);
(b) ``--model_name_or_path`` a full Llava or VoCo-Llava checkpoint; ``--voco_tokens k`` on a plain Llava
    checkpoint adds VoCo as ``llava_voco.add_voco_to_llava`` does, the VoCo finetune stage
    (``build_from_llava_checkpoint``).

Every refusal on flags or their combination with the directories named is made by ``plan_loading``, from
configs, tokenizers and the small projector file alone, before any model weight is read. The model is then
loaded in one dtype (``training_dtype``: bf16 under ``--bf16``, fp16 under ``--fp16`` with DeepSpeed, else
fp32), new parts (projector, LLaMA-VID, new token rows) in that dtype too; a model left with mixed dtypes is
refused.

Everything here works under DeepSpeed ZeRO-3, whose weights are partitioned as they load: whole weights
are gathered where they are read or written (``gathered``), and parts assembled by hand are built outside
ZeRO-3's init context (``zero3_context_off``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from dataclasses import dataclass, field, replace

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

from llava_voco.conversation import get_template
from llava_voco import VoCoLlavaConfig, VoCoLlavaForConditionalGeneration, VoCoLlavaProcessor
from llava_voco.constants import IMAGE_PLACEHOLDER, VOCO_TOKEN
from llava_voco.model.builder import add_special_tokens_with_mean_rows, gathered, use_voco_attention
from llava_voco.model.configuration_voco_llava import PROJECTOR_FIELDS, VOCO_FIELDS
from llava_voco.model.image_inputs import tokens_per_image
from llava_voco.model.projectors import get_projector, llava_projector_state_dict, projector_for
from llava_voco.model.attention import attention_backend, backend_running

from .arguments import (
    NEW_MODEL_PROJECTOR,
    SELECT_FEATURE,
    ModelArguments,
    TrainConfigError,
    TrainingArguments,
    one_line,
    parse_voco_train_tokens,
    training_dtype,
    vision_attn_implementation,
)

logger = logging.getLogger("llava_voco.train")


def read_config(flag: str, path: str, cache_dir: str | None = None):
    """The config of a model directory (no weight is read); a directory without one is a TrainConfigError."""
    from llava_voco.model.llava_original import is_llava_original

    if is_llava_original(path):
        raise TrainConfigError(
            f"{flag} {path}: a checkpoint in LLaVA's own format (llava_llama / llava_mistral); convert it first: "
            f"python scripts/convert_llava_checkpoint.py {path} OUTPUT_DIR [--vision-tower CLIP_DIR]"
        )
    try:
        return AutoConfig.from_pretrained(path, cache_dir=cache_dir)
    except (OSError, ValueError) as error:
        raise TrainConfigError(f"{flag} {path}: {one_line(str(error))}") from None


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


def load_vision_tower(path: str, cache_dir: str | None, attn_implementation: str, dtype: torch.dtype | None = None):
    config = AutoConfig.from_pretrained(path, cache_dir=cache_dir)
    vision_config = getattr(config, "vision_config", config)  # a full CLIP checkpoint holds its vision config
    model_class = MODEL_MAPPING[type(vision_config)]
    return model_class.from_pretrained(
        path, config=vision_config, cache_dir=cache_dir, attn_implementation=attn_implementation, dtype=dtype
    )


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


def load_projector_weights(model: VoCoLlavaForConditionalGeneration, state_dict: dict[str, torch.Tensor], path: str) -> None:
    """Put the weights ``read_projector_weights`` checked into the model's projector (in the model's dtype)."""
    projector = model.model.multi_modal_projector
    with gathered(list(projector.parameters())):
        projector.load_state_dict(state_dict)
    logger.info("loaded the projector from %s", path)


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
        projector_config = VoCoLlavaConfig(
            vision_config=plan.vision_config.to_dict(),
            text_config=config.to_dict(),
            vision_feature_layer=model_args.mm_vision_select_layer if model_args.mm_vision_select_layer is not None else -1,
            vision_feature_select_strategy=SELECT_FEATURE[select_feature],
            mm_projector_type=model_args.mm_projector_type or NEW_MODEL_PROJECTOR,
            vision_token_pooling=model_args.vision_token_pooling,
            frame_chunk=model_args.frame_chunk,
            **plan.projector_fields,
        )
    if model_args.pretrain_mm_mlp_adapter:
        plan.projector_state = read_projector_weights(model_args.pretrain_mm_mlp_adapter, projector_config)
    plan.voco_train_tokens = voco_train_tokens(model_args, projector_config)
    return plan


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


def build_from_llm_and_vision_tower(model_args: ModelArguments, training_args: TrainingArguments, plan: LoadPlan):
    """Set-up (a): a new VoCo-Llava from an LLM directory and a vision tower directory."""
    cache_dir = training_args.cache_dir
    voco_tokens = model_args.voco_tokens or 0
    tokenizer = AutoTokenizer.from_pretrained(
        model_args.model_name_or_path, cache_dir=cache_dir, model_max_length=training_args.model_max_length,
        padding_side="right",
    )
    image_processor = AutoImageProcessor.from_pretrained(model_args.vision_tower, cache_dir=cache_dir)
    llm = AutoModelForCausalLM.from_pretrained(
        model_args.model_name_or_path, cache_dir=cache_dir, attn_implementation=plan.attn, dtype=plan.dtype
    )
    vision_tower = load_vision_tower(model_args.vision_tower, cache_dir, plan.vision_attn, plan.dtype)

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
    config = VoCoLlavaConfig(
        vision_config=vision_config.to_dict(),
        text_config=llm.config.to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER),
        vision_feature_layer=model_args.mm_vision_select_layer if model_args.mm_vision_select_layer is not None else -1,
        vision_feature_select_strategy=strategy,
        tie_word_embeddings=llm.config.tie_word_embeddings,
        mm_projector_type=model_args.mm_projector_type or NEW_MODEL_PROJECTOR,
        voco_tokens=voco_tokens,
        voco_token_id=tokenizer.convert_tokens_to_ids(VOCO_TOKEN) if voco_tokens else None,
        voco_mask_mode=model_args.voco_mask_mode or "paper",
        frame_chunk=model_args.frame_chunk,
        vision_token_pooling=model_args.vision_token_pooling,
        **plan.projector_fields,
    )
    config.image_seq_length = tokens_per_image(config).image  # tokens one image becomes, VoCo tokens aside
    config.architectures = ["VoCoLlavaForConditionalGeneration"]
    config._attn_implementation = plan.attn
    # The shell is built on the meta device (no memory, no init), then the loaded parts are put in it.
    # (Outside DeepSpeed's ZeRO-3 context, which would try to initialise the meta weights; the loaded
    # parts are partitioned already, the projector is when the engine starts.)
    with torch.device("meta"), zero3_context_off(training_args):
        model = VoCoLlavaForConditionalGeneration(config)
    model.model.language_model = llm.model
    model.lm_head = llm.lm_head
    model.model.vision_tower = vision_tower
    # nn.Linear's own init, as LLaVA's projector, from --seed alone: the same weights however the other parts
    # were loaded (ZeRO-3's zero.Init draws random numbers while loading, one process does not); in the dtype
    # of the rest
    method = projector_for(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(training_args.seed)
        model.model.multi_modal_projector = method.build(config).to(plan.dtype)
    try:
        method.init_from_flags(model.model.multi_modal_projector, model_args)
    except ValueError as error:
        raise TrainConfigError(one_line(str(error))) from None
    model.config.text_config = llm.config
    model.config.vision_config = vision_config
    on_meta = [name for name, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if on_meta:
        raise RuntimeError(f"parameters left uninitialised while assembling the model: {on_meta[:5]}")
    use_voco_attention(model)  # the LLM was loaded before VoCo was part of it

    processor = VoCoLlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=1 if has_cls else 0,
        chat_template=tokenizer.chat_template,
        voco_tokens=voco_tokens,
        mm_projector_type=config.mm_projector_type,
        **method.processor_fields(config),
    )
    method.prepare_processor(processor, model_args)
    return model, processor


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


def build_from_llava_checkpoint(model_args: ModelArguments, training_args: TrainingArguments, plan: LoadPlan):
    """Set-up (b): a full Llava or VoCo-Llava checkpoint (transformers format)."""
    path = model_args.model_name_or_path
    config = checkpoint_config(model_args, plan.checkpoint_config, plan.vision_config)
    saved_voco = config.voco_tokens
    voco_tokens = model_args.voco_tokens if model_args.voco_tokens is not None else saved_voco
    model = VoCoLlavaForConditionalGeneration.from_pretrained(
        path, config=config, cache_dir=training_args.cache_dir, dtype=plan.dtype,
        attn_implementation={"": plan.vision_attn, "text_config": plan.attn, "vision_config": plan.vision_attn},
    )
    processor = transformers.AutoProcessor.from_pretrained(path, cache_dir=training_args.cache_dir)
    if voco_tokens and not saved_voco:
        # The VoCo finetune stage, as llava_voco.add_voco_to_llava does it.
        add_special_tokens_with_mean_rows(processor.tokenizer, model, [VOCO_TOKEN])
        model.config.voco_tokens = voco_tokens
        model.config.voco_token_id = processor.tokenizer.convert_tokens_to_ids(VOCO_TOKEN)
        model.config.voco_mask_mode = model_args.voco_mask_mode or "paper"
        use_voco_attention(model)
    processor = rebuild_processor(processor, voco_tokens)
    processor.tokenizer.model_max_length = training_args.model_max_length

    # LLaVA applies these flags to a full checkpoint too.
    if model_args.mm_vision_select_layer is not None and model_args.mm_vision_select_layer != model.config.vision_feature_layer:
        logger.warning("--mm_vision_select_layer %s replaces the checkpoint's vision_feature_layer %s",
                       model_args.mm_vision_select_layer, model.config.vision_feature_layer)
        model.config.vision_feature_layer = model_args.mm_vision_select_layer
    if model_args.vision_tower is not None:
        # LLaVA loads the vision tower's weights from --vision_tower, whatever the checkpoint holds.
        with zero3_context_off(training_args):  # whole weights to copy from
            tower = load_vision_tower(model_args.vision_tower, training_args.cache_dir, plan.vision_attn, plan.dtype)
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


def build_model_and_processor(model_args: ModelArguments, training_args: TrainingArguments, plan: LoadPlan | None = None):
    """The model and processor to train (``plan``: ``plan_loading``'s, made here when not given)."""
    if plan is None:
        plan = plan_loading(model_args, training_args)
    if plan.checkpoint_config is not None:
        model, processor = build_from_llava_checkpoint(model_args, training_args, plan)
    else:
        model, processor = build_from_llm_and_vision_tower(model_args, training_args, plan)
    if plan.projector_state is not None:
        load_projector_weights(model, plan.projector_state, model_args.pretrain_mm_mlp_adapter)
    if plan.voco_train_tokens and len(plan.voco_train_tokens) > 1:  # elastic k: saved with the model
        model.config.voco_train_tokens = plan.voco_train_tokens
        processor.voco_token_choices = plan.voco_train_tokens
    # the template's VoCo layout (voco_official: "<image>\\n<voco><voco>", docs/design.md §2.1), saved with the processor
    get_template(model_args.version).lay_out_voco(processor)
    check_one_dtype(model, plan.dtype)
    running = model.model.language_model.config._attn_implementation
    if running != attention_backend(plan.attn).implementation:
        raise TrainConfigError(f"--attn_implementation {plan.attn}: the language model would run {running}")
    model.config.text_config.use_cache = False  # training; set back on save
    return model, processor


def check_one_dtype(model, dtype: torch.dtype) -> None:
    """Every floating-point weight in ``dtype``: a model of mixed dtypes fails inside autocast (fp16 weights
    under a bf16 autocast on CPU) or trains parts at a precision nobody chose."""
    found: dict[torch.dtype, list[str]] = {}
    for name, param in model.named_parameters():
        if param.is_floating_point():
            found.setdefault(param.dtype, []).append(name)
    others = {str(d).removeprefix("torch."): names for d, names in found.items() if d != dtype}
    if others:
        listed = "; ".join(f"{d}: {len(names)} weights, e.g. {names[0]}" for d, names in others.items())
        raise TrainConfigError(
            f"the model mixes dtypes: training in {str(dtype).removeprefix('torch.')} (--bf16 / --fp16 / neither), "
            f"but {listed}; load every part in one dtype"
        )


def attention_backends(model) -> str:
    """Which attention backend each part runs, for the log (never a silent fall back)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    text = base.model.language_model.config._attn_implementation
    vision = base.model.vision_tower.config._attn_implementation
    if base.config.voco_tokens == 0:
        return f"language model {text} (VoCo off: causal; packed rows kept apart), vision tower {vision}"
    backend = backend_running(text)
    return f"language model {text} ({backend.log if backend else 'not in the backend table'}), vision tower {vision}"


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
        # ... but the rows of <voco>, the only new parameters VoCo has, train (the rest of the embedding stays)
        voco_rows = voco_token_ids(model)
        if voco_rows and not model_args.tune_mm_mlp_adapter:
            train_rows_only(model.get_input_embeddings().weight, voco_rows)
    if not model_args.unfreeze_mm_vision_tower:
        model.model.vision_tower.requires_grad_(False)
    if training_args.freeze_mm_mlp_adapter:
        model.model.multi_modal_projector.requires_grad_(False)
    projector_for(model.config).freeze_from_flags(model.model.multi_modal_projector, model_args)

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
            # The <voco> rows (embedding, and lm_head when untied) are VoCo's only new parameters: they train as
            # PEFT trainable tokens, are saved with the adapter and merged into the weights.
            trainable_token_indices=voco_trainable_tokens(model),
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


# Set on an embedding weight of which only some rows train (``train_rows_only``): the optimizer gives it no
# weight decay, so the other rows (zero gradient) stay exactly as they are.
ROWS_ONLY = "llava_voco_rows_only"


def voco_token_ids(model) -> list[int]:
    config = model.config
    return [config.voco_token_id] if config.voco_tokens > 0 and config.voco_token_id is not None else []


def voco_trainable_tokens(model) -> dict[str, list[int]] | None:
    """PEFT's ``trainable_token_indices`` for the <voco> rows: the input embedding's, and lm_head's when it is
    not tied to it (a tied lm_head follows the embedding)."""
    rows = voco_token_ids(model)
    if not rows:
        return None
    tokens = {"embed_tokens": rows}
    if model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
        tokens["lm_head"] = rows
    return tokens


def train_rows_only(weight: torch.nn.Parameter, rows: list[int]) -> None:
    """Train ``rows`` of ``weight`` and nothing else of it: the gradient of every other row is zeroed before it
    is accumulated (so under DeepSpeed too), and the weight gets no weight decay (``ROWS_ONLY``), so Adam
    leaves those rows exactly as they are."""
    num_rows = getattr(weight, "ds_shape", weight.shape)[0]  # ZeRO-3 partitions hold a slice
    keep = torch.zeros(num_rows, 1, dtype=torch.bool)
    keep[rows] = True
    weight.requires_grad_(True)
    weight.register_hook(lambda grad: grad * keep.to(device=grad.device, dtype=grad.dtype))
    setattr(weight, ROWS_ONLY, list(rows))


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
