"""LLaVA with VoCo compression: each image's vision tokens are read by later text only through the
``voco_tokens`` VoCo tokens that follow it (docs/design.md §2).

Nothing here copies the language model: the VoCo rule (``voco_mask.VoCoLayout``) is turned into a mask in
the format of the attention backend (boolean for sdpa, additive float for eager, a BlockMask for flex,
through transformers' ``create_causal_mask(and_mask_function=...)``), and the 4D result is passed to the
language model, which uses a 4D mask as given. What an image becomes is ``image_inputs``; compression
(``compress`` / ``generate`` from a cache) is ``voco_generation``. Parameter names are Llava's, so Llava
state dicts load unchanged.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModel, LlavaForConditionalGeneration, LlavaModel
from transformers.cache_utils import Cache
from transformers.masking_utils import (
    ALL_MASK_ATTENTION_FUNCTIONS,
    create_causal_mask,
    eager_mask,
    flex_attention_mask,
    sdpa_mask,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava.modeling_llava import LlavaPreTrainedModel

from .configuration_voco_llava import VoCoLlavaConfig
from .image_inputs import ImageInputs, encode_images, vision_patch_features
from .projector import build_projector
from .varlen import PLAN_KWARG, VARLEN_IMPLEMENTATIONS, VOCO_FLASH, build_varlen_plan, require_flash_attn
from .voco_cache import VoCoCache
from .voco_generation import VoCoGenerationMixin
from .voco_mask import VoCoLayout, packed_sample_index

# Mask builders that honour a mask function. flash-attn's builder only keeps padding, so it would silently
# drop the VoCo rule: its varlen path is a separate backend (docs/design.md §2.5).
_MASK_BUILDERS_WITH_MASK_FUNCTION = (sdpa_mask, eager_mask, flex_attention_mask)


class VoCoLlavaModel(LlavaModel):
    config_class = VoCoLlavaConfig
    config: VoCoLlavaConfig

    def __init__(self, config: VoCoLlavaConfig):
        # Llava's parts, each built once (LlavaModel.__init__ would build a projector we would then replace:
        # under ZeRO-3's zero.Init that allocates and partitions it for nothing).
        LlavaPreTrainedModel.__init__(self, config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = build_projector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        # False only to train the VoCo paper's lower bound (``--voco_mask_in_training False``): VoCo tokens in
        # the sequence but plain causal attention, so text learns to read the vision tokens; the saved model
        # is then evaluated with the mask. Not a config field: a checkpoint always loads with the mask on.
        self.apply_voco_mask = True
        if config.voco_tokens > 0 and self.language_model.config._attn_implementation == "flash_attention_2":
            # transformers' flash path keeps only padding and would drop the rule: the same kernel, through
            # the VoCo segment plan (varlen.py)
            self.language_model.config._attn_implementation = VOCO_FLASH
        self.post_init()

    def vision_patch_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[images, N, C]``: what precomputed frame features store (``image_inputs.vision_patch_features``)."""
        return vision_patch_features(self, pixel_values)

    def encode_images(self, pixel_values: torch.Tensor | None = None, **image_inputs) -> list[torch.Tensor]:
        """Each image's tokens for the LLM (``image_inputs.encode_images``); takes the forward's image inputs."""
        return encode_images(self, ImageInputs.from_forward(pixel_values, **image_inputs))

    def voco_layout(
        self,
        input_ids: torch.LongTensor,  # [batch, seq] the whole sequence
        attention_mask: torch.Tensor | None = None,  # [batch, seq]
        pixel_values: torch.Tensor | None = None,
        *,
        images: ImageInputs | None = None,
        sample_index: torch.Tensor | None = None,
        **image_inputs,
    ) -> VoCoLayout | None:
        """The layout of the sequence in ``input_ids``, or None when VoCo is off. With the images given (as
        ``images`` or as forward inputs), their count and each one's token count are checked too."""
        if self.config.voco_tokens == 0:
            return None
        if images is None:
            image_inputs.pop("image_sizes", None)
            images = ImageInputs.from_forward(pixel_values, **image_inputs)
        return VoCoLayout.from_input_ids(
            input_ids,
            attention_mask if attention_mask is not None and attention_mask.ndim == 2 else None,
            image_token_id=self.config.image_token_id,
            voco_token_id=self.config.voco_token_id,
            voco_tokens=self.config.voco_token_counts,
            mode=self.config.voco_mask_mode,
            num_images=len(images) if images is not None else None,
            tokens_per_image=images.token_counts(self.config) if images is not None else None,
            sample_index=sample_index,
        )

    def continuation_layout(
        self, input_ids: torch.LongTensor | None, cache: VoCoCache, query_length: int, new_mask: torch.Tensor,
        images: ImageInputs | None, cache_length: int | None = None,
    ) -> VoCoLayout | None:
        """Layout of (cache, new tokens) when continuing a compressed cache; None when no mask beyond causal
        and padding is needed (paper mode, no image in the new tokens). ``cache_length``: the cached positions
        ``input_ids`` follow (default: all of them; ``generate`` passes the described ones and every token
        after them)."""
        new_has_images = input_ids is not None and bool(
            ((input_ids == self.config.image_token_id) | (input_ids == self.config.voco_token_id)).any()
        )
        if not new_has_images and self.config.voco_mask_mode == "paper":
            return None
        new_tokens = self.voco_layout(input_ids, new_mask, images=images) if new_has_images else None
        return VoCoLayout.continuing(
            new_tokens,
            cache_length=cache.get_seq_length() if cache_length is None else cache_length,
            cache_first_voco=cache.first_voco_index(self.config.voco_token_id).to(new_mask.device),
            batch_size=new_mask.shape[0],
            query_length=query_length,
            mode=self.config.voco_mask_mode,
        )

    def voco_attention_mask(
        self,
        voco_layout: VoCoLayout,
        query_length: int,
        batch_size: int,
        attention_mask: torch.Tensor | None,  # [batch, past + query] padding, or None
        past_key_values: Cache | None,
        position_ids: torch.Tensor | None,
    ):
        """Causal + padding + VoCo mask in the format of the language model's attention backend."""
        text_config = self.language_model.config
        implementation = text_config._attn_implementation
        builder = ALL_MASK_ATTENTION_FUNCTIONS.get(implementation)
        if builder not in _MASK_BUILDERS_WITH_MASK_FUNCTION:
            raise ValueError(
                f"the VoCo mask cannot be expressed with attn_implementation={implementation!r} "
                "(its mask builder ignores mask functions); use 'sdpa', 'eager' or 'flex_attention'"
            )
        embedding = self.get_input_embeddings().weight
        if builder in (sdpa_mask, eager_mask):
            # The rule evaluated by broadcasting (VoCoLayout.dense_mask), in the format sdpa_mask / eager_mask
            # give: what create_causal_mask would build, without its per-element vmap (costly per call).
            past_length = past_key_values.get_seq_length() if past_key_values is not None else 0
            allowed = voco_layout.dense_mask(attention_mask, q_offset=past_length, q_length=query_length)
            if builder is sdpa_mask:
                return allowed  # [batch, 1, query, past + query] bool
            zero = torch.zeros((), dtype=embedding.dtype, device=allowed.device)
            return torch.where(allowed, zero, torch.finfo(embedding.dtype).min)
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
        input_ids: torch.LongTensor | None = None,  # [batch, seq]
        pixel_values: torch.Tensor | None = None,  # [images with pixels, 3, H, W]
        attention_mask: torch.Tensor | None = None,  # [batch, seq] (or [batch, past + seq]), or a 4D mask used as given
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        voco_layout: VoCoLayout | None = None,
        instruction_input_ids: torch.LongTensor | None = None,
        instruction_attention_mask: torch.Tensor | None = None,
        video_frame_mask: torch.Tensor | None = None,
        frame_features: torch.Tensor | None = None,
        frame_features_mask: torch.Tensor | None = None,
        **kwargs,
    ):
        r"""
        instruction_input_ids, instruction_attention_mask (`[images, L]`), video_frame_mask (`[images]`):
            LLaMA-VID only: each image's instruction for the text decoder, and which images are video frames.
        frame_features (`torch.Tensor` of shape `(frames, patches, vision_hidden_size)`, *optional*):
            Video frames given as precomputed patch features (`vision_patch_features`; written by
            `scripts/extract_video_features.py`) in place of pixels: the vision tower is skipped for them, the
            tokens are those of their pixels.
        frame_features_mask (`torch.BoolTensor` of shape `(images,)`, *optional*):
            Which images, in token order, are `frame_features` (the others are `pixel_values`, in order).
            Needed only when both are given.
        voco_layout (`VoCoLayout`, *optional*):
            Layout of the whole sequence (cached tokens included). Derived from `input_ids` when they are the
            whole sequence or continue a `VoCoCache`; `generate` passes it at every step otherwise.
        """
        images = ImageInputs.from_forward(
            pixel_values, frame_features, frame_features_mask, video_frame_mask,
            instruction_input_ids, instruction_attention_mask,
        )
        batch_size, query_length = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        mask_is_4d = attention_mask is not None and attention_mask.ndim == 4
        past_length = past_key_values.get_seq_length() if past_key_values is not None else 0
        if isinstance(past_key_values, VoCoCache) and past_length > 0 and not mask_is_4d:
            # Continuing a compressed cache: it holds only what later tokens may read; the rule applies
            # within the new tokens (an image compressed after others), and official mode keeps text off
            # the cached prefix.
            attention_mask, position_ids = past_key_values.continuation_inputs(
                batch_size, query_length, attention_mask, position_ids
            )
            if voco_layout is None and self.config.voco_tokens > 0:
                voco_layout = self.continuation_layout(
                    input_ids, past_key_values, query_length, attention_mask[:, -query_length:], images
                )
        elif self.config.voco_tokens > 0 and self.apply_voco_mask and not mask_is_4d and voco_layout is None:
            if input_ids is None:
                raise ValueError("VoCo needs input_ids (or a voco_layout) to find the image and VoCo tokens")
            if past_length > 0:
                raise ValueError(
                    "continuing from a cache with VoCo on needs voco_layout= the layout of the whole sequence "
                    "(VoCoLayout.from_input_ids on all ids so far), or a VoCoCache from model.compress(); "
                    "generate() passes the layout itself"
                )
            voco_layout = self.voco_layout(
                input_ids, attention_mask, images=images, sample_index=packed_sample_index(position_ids)
            )
        elif voco_layout is None and not mask_is_4d and past_length == 0:
            # packed rows without VoCo (or training the lower bound): only "no token reads another sample";
            # transformers' own flash path reads packed position ids itself
            sample_index = packed_sample_index(position_ids)
            if sample_index is not None and self.language_model.config._attn_implementation != "flash_attention_2":
                voco_layout = VoCoLayout.packed_only(sample_index, self.config.voco_mask_mode)
        with_rule = (voco_layout is not None and not mask_is_4d
                     and (voco_layout.has_voco and self.apply_voco_mask or voco_layout.sample_index is not None))
        if self.language_model.config._attn_implementation in VARLEN_IMPLEMENTATIONS and not mask_is_4d:
            # no mask at all: the rule (or plain causal attention) as varlen segments, padding never computed
            padding = attention_mask if attention_mask is not None and attention_mask.ndim == 2 else None
            kwargs[PLAN_KWARG] = build_varlen_plan(
                voco_layout if with_rule else None, padding, batch_size=batch_size, q_offset=past_length,
                q_length=query_length, device=(input_ids if input_ids is not None else inputs_embeds).device,
            )
        elif with_rule:
            attention_mask = self.voco_attention_mask(
                voco_layout, query_length, batch_size, attention_mask, past_key_values, position_ids
            )
        if images is not None:
            # Llava's extension point for image features computed outside it: it scatters them into the
            # image tokens (and checks their count).
            image_features = encode_images(self, images)  # per image [tokens, D]
            kwargs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=image_features)}
        return super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            **kwargs,
        )


class VoCoLlavaForConditionalGeneration(VoCoGenerationMixin, LlavaForConditionalGeneration):
    config_class = VoCoLlavaConfig
    config: VoCoLlavaConfig

    def __init__(self, config: VoCoLlavaConfig):
        # as LlavaForConditionalGeneration.__init__, with our model built in place of Llava's (not after it)
        LlavaPreTrainedModel.__init__(self, config)
        self.model = VoCoLlavaModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def from_pretrained(cls, *args, attn_implementation: str | dict | None = None, **kwargs):
        """``from_pretrained``; ``attn_implementation="flash_attention_2"`` without flash-attn installed is refused
        here, before any weight is read, naming the extra that installs it."""
        asked = attn_implementation.values() if isinstance(attn_implementation, dict) else [attn_implementation]
        if "flash_attention_2" in asked:
            require_flash_attn()
        return super().from_pretrained(*args, attn_implementation=attn_implementation, **kwargs)

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
        instruction_input_ids: torch.LongTensor | None = None,
        instruction_attention_mask: torch.Tensor | None = None,
        video_frame_mask: torch.Tensor | None = None,
        frame_features: torch.Tensor | None = None,
        frame_features_mask: torch.Tensor | None = None,
        **kwargs,
    ):
        r"""Llava's forward; the extra inputs as in `VoCoLlavaModel.forward` (named here so `generate`
        passes them)."""
        extra = {
            "voco_layout": voco_layout,
            "instruction_input_ids": instruction_input_ids,
            "instruction_attention_mask": instruction_attention_mask,
            "video_frame_mask": video_frame_mask,
            "frame_features": frame_features,
            "frame_features_mask": frame_features_mask,
        }
        kwargs.update({name: value for name, value in extra.items() if value is not None})
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


__all__ = ["VoCoLlavaModel", "VoCoLlavaForConditionalGeneration"]
