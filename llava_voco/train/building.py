"""Step 2 of the recipe: the model and processor to train, built by the ``LoadPlan`` of ``plan``.

(a) ``--model_name_or_path`` an LLM directory + ``--vision_tower`` a CLIP vision directory: a new
    ``VoCoLlavaForConditionalGeneration`` holding both, the projector from ``--mm_projector_type``
    (optionally loaded from ``--pretrain_mm_mlp_adapter``), ``<image>`` (and ``<voco>``) added to the
    tokenizer (``build_from_llm_and_vision_tower``);
(b) ``--model_name_or_path`` a full Llava or VoCo-Llava checkpoint; ``--voco_tokens k`` on a plain Llava
    checkpoint adds VoCo as ``llava_voco.add_voco_to_llava`` does, the VoCo finetune stage
    (``build_from_llava_checkpoint``).

The model is loaded in one dtype (``training_dtype``: bf16 under ``--bf16``, fp16 under ``--fp16`` with
DeepSpeed, else fp32), new parts (projector, LLaMA-VID, new token rows) in that dtype too; a model left with
mixed dtypes is refused.

Everything here works under DeepSpeed ZeRO-3, whose weights are partitioned as they load: whole weights
are gathered where they are read or written (``gathered``), and parts assembled by hand are built outside
ZeRO-3's init context (``zero3_context_off``)."""

from __future__ import annotations

import contextlib
import logging

import torch
import transformers
from transformers import AutoConfig, AutoImageProcessor, AutoModelForCausalLM, AutoTokenizer
from transformers.integrations.deepspeed import (
    is_deepspeed_zero3_enabled,
    set_hf_deepspeed_config,
    unset_hf_deepspeed_config,
)
from transformers.models.auto.modeling_auto import MODEL_MAPPING

from llava_voco import VoCoLlavaForConditionalGeneration, VoCoLlavaProcessor
from llava_voco.constants import IMAGE_PLACEHOLDER, VOCO_TOKEN
from llava_voco.conversation import get_template
from llava_voco.model.attention import attention_backend
from llava_voco.model.builder import add_special_tokens_with_mean_rows, gathered, turn_voco_on, use_voco_attention
from llava_voco.model.image_inputs import tokens_per_image
from llava_voco.model.projectors import projector_for

from .arguments import ModelArguments, TrainConfigError, TrainingArguments, one_line
from .plan import LoadPlan, checkpoint_config, new_model_config, plan_loading

logger = logging.getLogger("llava_voco.train")


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
    has_cls = vision_config.model_type == "clip_vision_model"
    config = new_model_config(
        model_args, llm.config, vision_config, plan.projector_fields,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER),
        tie_word_embeddings=llm.config.tie_word_embeddings,
        voco_tokens=voco_tokens,
        voco_token_id=tokenizer.convert_tokens_to_ids(VOCO_TOKEN) if voco_tokens else None,
        voco_mask_mode=model_args.voco_mask_mode or "paper",
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
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1 if has_cls else 0,
        chat_template=tokenizer.chat_template,
        voco_tokens=voco_tokens,
        mm_projector_type=config.mm_projector_type,
        **method.processor_fields(config),
    )
    method.prepare_processor(processor, model_args)
    return model, processor


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
        turn_voco_on(model, processor.tokenizer, voco_tokens, model_args.voco_mask_mode or "paper")  # VoCo finetune stage
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


def load_vision_tower(path: str, cache_dir: str | None, attn_implementation: str, dtype: torch.dtype | None = None):
    config = AutoConfig.from_pretrained(path, cache_dir=cache_dir)
    vision_config = getattr(config, "vision_config", config)  # a full CLIP checkpoint holds its vision config
    model_class = MODEL_MAPPING[type(vision_config)]
    return model_class.from_pretrained(
        path, config=vision_config, cache_dir=cache_dir, attn_implementation=attn_implementation, dtype=dtype
    )


def load_projector_weights(model: VoCoLlavaForConditionalGeneration, state_dict: dict[str, torch.Tensor], path: str) -> None:
    """Put the weights ``read_projector_weights`` checked into the model's projector (in the model's dtype)."""
    projector = model.model.multi_modal_projector
    with gathered(list(projector.parameters())):
        projector.load_state_dict(state_dict)
    logger.info("loaded the projector from %s", path)


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


def rebuild_processor(processor, voco_tokens: int) -> VoCoLlavaProcessor:
    return VoCoLlavaProcessor.from_llava_processor(processor, voco_tokens)


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
