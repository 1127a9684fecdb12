"""LLaVA with VoCo compression: each image's vision tokens are read by later text only through the
``voco_tokens`` VoCo tokens that follow it (DESIGN 2).

Nothing here copies the language model: the VoCo rule (``voco_mask.VoCoLayout``) is handed to
transformers' ``create_causal_mask`` as an ``and_mask_function``, which builds the mask in each
backend's own format (additive float for eager, boolean for sdpa, a BlockMask for flex); the 4D result
is then passed to the language model, which uses a 4D mask as given. Parameter names are Llava's, so
Llava state dicts load unchanged.
"""

from __future__ import annotations

import torch
from transformers import LlavaForConditionalGeneration, LlavaModel
from transformers.cache_utils import Cache
from transformers.masking_utils import (
    ALL_MASK_ATTENTION_FUNCTIONS,
    create_causal_mask,
    eager_mask,
    flex_attention_mask,
    sdpa_mask,
)

from .configuration_voco_llava import VoCoLlavaConfig
from .voco_mask import VoCoLayout

# Mask builders that honour a mask function. flash-attn's builder only keeps padding, so it would
# silently drop the VoCo rule: its varlen path is a separate backend (DESIGN 2.5).
_MASK_BUILDERS_WITH_MASK_FUNCTION = (sdpa_mask, eager_mask, flex_attention_mask)


class VoCoLlavaModel(LlavaModel):
    config_class = VoCoLlavaConfig
    config: VoCoLlavaConfig

    def voco_layout(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
    ) -> VoCoLayout | None:
        """The layout of the full sequence in ``input_ids``, or None when VoCo is off."""
        if self.config.voco_tokens == 0:
            return None
        num_images = tokens_per_image = None
        if pixel_values is not None:
            num_images = len(image_sizes) if image_sizes is not None else pixel_values.shape[0]
            if image_sizes is None and num_images:
                tokens_per_image = int((input_ids == self.config.image_token_id).sum()) // num_images
        return VoCoLayout.from_input_ids(
            input_ids,
            attention_mask if attention_mask is not None and attention_mask.ndim == 2 else None,
            image_token_id=self.config.image_token_id,
            voco_token_id=self.config.voco_token_id,
            voco_tokens=self.config.voco_tokens,
            mode=self.config.voco_mask_mode,
            num_images=num_images,
            tokens_per_image=tokens_per_image,
        )

    def voco_attention_mask(
        self,
        voco_layout: VoCoLayout,
        query_length: int,
        batch_size: int,
        attention_mask: torch.Tensor | None,
        past_key_values: Cache | None,
        position_ids: torch.Tensor | None,
    ):
        """Causal + padding + VoCo mask in the format of the language model's attention backend."""
        text_config = self.language_model.config
        implementation = text_config._attn_implementation
        builder = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(implementation)
        if builder not in _MASK_BUILDERS_WITH_MASK_FUNCTION:
            raise ValueError(
                f"the VoCo mask cannot be expressed with attn_implementation={implementation!r} "
                "(its mask builder ignores mask functions); use 'sdpa', 'eager' or 'flex_attention'"
            )
        embedding = self.get_input_embeddings().weight
        shape_only = torch.empty((batch_size, query_length, 0), dtype=embedding.dtype, device=embedding.device)
        return create_causal_mask(
            config=text_config,
            inputs_embeds=shape_only,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            position_ids=position_ids,
            and_mask_function=voco_layout.mask_function(),
        )

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        voco_layout: VoCoLayout | None = None,
        **kwargs,
    ):
        r"""
        voco_layout (`VoCoLayout`, *optional*):
            Layout of the whole sequence (cached tokens included). Derived from `input_ids` when they are
            the whole sequence; `generate` passes it at every step. Needed when continuing from a cache.
        """
        mask_is_4d = attention_mask is not None and attention_mask.ndim == 4
        if self.config.voco_tokens > 0 and not mask_is_4d:
            past_length = past_key_values.get_seq_length() if past_key_values is not None else 0
            if voco_layout is None:
                if input_ids is None:
                    raise ValueError("VoCo needs input_ids (or a voco_layout) to find the image and VoCo tokens")
                if past_length > 0:
                    raise ValueError(
                        "continuing from a cache with VoCo on needs voco_layout= the layout of the whole "
                        "sequence (VoCoLayout.from_input_ids on all ids so far); generate() passes it itself"
                    )
                voco_layout = self.voco_layout(input_ids, attention_mask, pixel_values, kwargs.get("image_sizes"))
            if voco_layout is not None and voco_layout.has_voco:
                batch_size, query_length = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
                attention_mask = self.voco_attention_mask(
                    voco_layout, query_length, batch_size, attention_mask, past_key_values, position_ids
                )
        return super().forward(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            **kwargs,
        )


class VoCoLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    config_class = VoCoLlavaConfig
    config: VoCoLlavaConfig

    def __init__(self, config: VoCoLlavaConfig):
        super().__init__(config)
        self.model = VoCoLlavaModel(config)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        image_sizes: torch.Tensor | None = None,
        voco_layout: VoCoLayout | None = None,
        **kwargs,
    ):
        r"""Llava's forward; `voco_layout` as in `VoCoLlavaModel.forward` (named here so `generate` passes it)."""
        if voco_layout is not None:
            kwargs["voco_layout"] = voco_layout
        return super().forward(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            labels=labels,
            logits_to_keep=logits_to_keep,
            image_sizes=image_sizes,
            **kwargs,
        )

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None, **kwargs):
        """Adds the layout of the whole sequence so far: decoding steps only see their new token."""
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, past_key_values=past_key_values, attention_mask=attention_mask, **kwargs
        )
        if self.config.voco_tokens > 0 and input_ids is not None and input_ids.shape[1] > 0:
            if attention_mask is None or attention_mask.ndim == 2:
                model_inputs["voco_layout"] = self.model.voco_layout(
                    input_ids, attention_mask, model_inputs.get("pixel_values"), model_inputs.get("image_sizes")
                )
        return model_inputs


__all__ = ["VoCoLlavaModel", "VoCoLlavaForConditionalGeneration"]
