"""Turn a plain LLaVA checkpoint into a VoCo one (the start of VoCo fine-tuning)."""

from __future__ import annotations

import os

import torch
from transformers import AddedToken, AutoProcessor, LlavaConfig

from .configuration_voco_llava import VOCO_FIELDS, VoCoLlavaConfig
from .modeling_voco_llava import VoCoLlavaForConditionalGeneration
from .processing_voco_llava import VOCO_TOKEN, VoCoLlavaProcessor


def add_voco_to_llava(
    llava_path: str | os.PathLike,
    voco_tokens: int = 1,
    voco_mask_mode: str = "paper",
    output_dir: str | os.PathLike | None = None,
    **from_pretrained_kwargs,
) -> tuple[VoCoLlavaForConditionalGeneration, VoCoLlavaProcessor]:
    """Load a ``LlavaForConditionalGeneration`` checkpoint (with its processor) as a VoCo model.

    Adds ``<voco>`` to the tokenizer as a special token, grows the embedding matrix (and an untied
    ``lm_head``) if the token needs a new row, and sets that row to the mean of the rows of the tokens
    the tokenizer had before. The mean is a neutral, deterministic start: the new token's logit and
    embedding begin at the vocabulary's average instead of at random values that could dominate early
    fine-tuning. Saves model and processor to ``output_dir`` when given.
    """
    processor = AutoProcessor.from_pretrained(llava_path)
    tokenizer = processor.tokenizer
    rows_of_known_tokens = len(tokenizer)
    voco_ids = tokenizer.convert_tokens_to_ids([VOCO_TOKEN])
    newly_added = voco_ids[0] is None or voco_ids[0] == tokenizer.unk_token_id
    if newly_added:
        tokenizer.add_special_tokens(
            {"extra_special_tokens": [AddedToken(VOCO_TOKEN, special=True, normalized=False)]},
            replace_extra_special_tokens=False,
        )
    voco_token_id = tokenizer.convert_tokens_to_ids(VOCO_TOKEN)

    llava_config = LlavaConfig.from_pretrained(llava_path)
    values = {k: v for k, v in llava_config.to_dict().items() if k not in ("model_type", *VOCO_FIELDS)}
    config = VoCoLlavaConfig(
        **values, voco_tokens=voco_tokens, voco_token_id=voco_token_id, voco_mask_mode=voco_mask_mode
    )
    config.architectures = ["VoCoLlavaForConditionalGeneration"]
    model = VoCoLlavaForConditionalGeneration.from_pretrained(llava_path, config=config, **from_pretrained_kwargs)

    if voco_token_id >= model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(voco_token_id + 1, mean_resizing=False)
    if newly_added:
        with torch.no_grad():
            for embedding in {model.get_input_embeddings().weight, model.get_output_embeddings().weight}:
                embedding[voco_token_id] = embedding[:rows_of_known_tokens].mean(dim=0)

    processor = VoCoLlavaProcessor.from_llava_processor(processor, voco_tokens, tokenizer=tokenizer)
    if output_dir is not None:
        model.save_pretrained(output_dir)
        processor.save_pretrained(output_dir)
    return model, processor
