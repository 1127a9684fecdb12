"""Turn a plain LLaVA checkpoint into a VoCo one (the start of VoCo fine-tuning), and add tokens to a model.

``add_special_tokens_with_mean_rows`` is the one way new tokens (``<voco>``, ``<image>``, a pad token) get
their embedding rows, here and in the training entry; it works under DeepSpeed ZeRO-3 too, where each
rank holds a slice of every weight (``gathered``).
"""

from __future__ import annotations

import contextlib
import os

import torch
from transformers import AddedToken, AutoProcessor, LlavaConfig
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

from ..constants import VOCO_TOKEN
from .attention import implementation_with_voco
from .configuration_voco_llava import VOCO_FIELDS, VoCoLlavaConfig
from .modeling_voco_llava import VoCoLlavaForConditionalGeneration
from .processing_voco_llava import VoCoLlavaProcessor


def gathered(params):
    """Under DeepSpeed ZeRO-3, the whole parameters (modified on rank 0, then re-partitioned); else a no-op."""
    if is_deepspeed_zero3_enabled():
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=0)
    return contextlib.nullcontext()


def add_special_tokens_with_mean_rows(tokenizer, model, tokens: list[str]) -> list[int]:
    """Add ``tokens`` to ``tokenizer`` as special tokens where absent, growing ``model``'s embedding matrix
    (and an untied ``lm_head``) if a new id needs a row; each new token's rows start at the mean of the rows
    of the tokens the tokenizer had before. Returns the ids of ``tokens``.

    The mean is a neutral, deterministic start: the new token's logit and embedding begin at the
    vocabulary's average instead of at random values that could dominate early fine-tuning (LLaVA's
    token resizing does the same). Tokens the tokenizer already has keep their rows.
    """
    missing = [t for t in tokens if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)]
    if missing:
        known = len(tokenizer)
        tokenizer.add_special_tokens(
            {"extra_special_tokens": [AddedToken(t, special=True, normalized=False) for t in missing]},
            replace_extra_special_tokens=False,
        )
        new_ids = tokenizer.convert_tokens_to_ids(missing)
        if max(new_ids) >= model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(max(new_ids) + 1, mean_resizing=False)
        weights = list({model.get_input_embeddings().weight, model.get_output_embeddings().weight})
        with gathered(weights), torch.no_grad():  # whole rows under ZeRO-3; rank 0's values are broadcast on exit
            for weight in weights:
                # the mean in fp32 (a bf16 / fp16 sum over 32,000 rows loses digits), stored in the weight's dtype
                weight[new_ids] = weight[:known].float().mean(dim=0).to(weight.dtype)
    return tokenizer.convert_tokens_to_ids(list(tokens))


def use_voco_attention(model) -> None:
    """A model whose VoCo was switched on after it was built (``add_voco_to_llava``, the training entry):
    with ``flash_attention_2`` its language model would run transformers' flash path, which keeps only
    padding and would drop the VoCo rule; it runs flash-attn through the VoCo segment plan instead, as a
    model built with VoCo on does (docs/design.md §2.5; ``attention.implementation_with_voco``)."""
    text_config = model.model.language_model.config
    if model.config.voco_tokens > 0:
        text_config._attn_implementation = implementation_with_voco(text_config._attn_implementation)


def turn_voco_on(model, tokenizer, voco_tokens: int, voco_mask_mode: str | None = None) -> None:
    """VoCo on a VoCo-Llava model loaded from a plain Llava checkpoint: ``<voco>`` added to ``tokenizer`` and the
    model (its rows at the mean of the existing ones), its id and count (and mask mode, when given) in the
    config, VoCo's attention installed. ``add_voco_to_llava`` and the training entry's VoCo finetune stage
    both start here."""
    (model.config.voco_token_id,) = add_special_tokens_with_mean_rows(tokenizer, model, [VOCO_TOKEN])
    model.config.voco_tokens = voco_tokens
    if voco_mask_mode is not None:
        model.config.voco_mask_mode = voco_mask_mode
    use_voco_attention(model)


def add_voco_to_llava(
    llava_path: str | os.PathLike,
    voco_tokens: int = 1,
    voco_mask_mode: str = "paper",
    output_dir: str | os.PathLike | None = None,
    **from_pretrained_kwargs,
) -> tuple[VoCoLlavaForConditionalGeneration, VoCoLlavaProcessor]:
    """Load a ``LlavaForConditionalGeneration`` checkpoint (with its processor) as a VoCo model.

    Adds ``<voco>`` with ``add_special_tokens_with_mean_rows`` (a new token's rows start at the mean of the
    existing rows). Saves model and processor to ``output_dir`` when given.
    """
    if voco_tokens < 0:
        raise ValueError(f"voco_tokens must be >= 0, got {voco_tokens}")
    processor = AutoProcessor.from_pretrained(llava_path)
    llava_config = LlavaConfig.from_pretrained(llava_path)
    values = {k: v for k, v in llava_config.to_dict().items() if k not in ("model_type", *VOCO_FIELDS)}
    config = VoCoLlavaConfig(**values, voco_mask_mode=voco_mask_mode)  # VoCo on once <voco> has its id, below
    config.architectures = ["VoCoLlavaForConditionalGeneration"]
    model = VoCoLlavaForConditionalGeneration.from_pretrained(llava_path, config=config, **from_pretrained_kwargs)
    tokenizer = processor.tokenizer
    turn_voco_on(model, tokenizer, voco_tokens)

    processor = VoCoLlavaProcessor.from_llava_processor(processor, voco_tokens, tokenizer=tokenizer)
    if output_dir is not None:
        model.save_pretrained(output_dir)
        processor.save_pretrained(output_dir)
    return model, processor
