"""LLaVA with VoCo compression: each image's vision tokens are read by later text only through the
``voco_tokens`` VoCo tokens that follow it (docs/design.md §2).

Nothing here copies the language model. ``prepare_attention`` is the one place attention is prepared: the
VoCo rule's layout (``voco_mask.VoCoLayout``) is turned into what the language model's attention backend takes,
looked up in ``attention.py``'s table: a dense mask (boolean for sdpa, additive float for eager), a BlockMask
(flex, through transformers' ``create_causal_mask(and_mask_function=...)``) or a varlen segment plan. What an
image becomes is ``image_inputs`` (``get_image_features``, transformers' hook); compression (``compress`` /
``generate`` from a cache) is ``voco_generation``. Parameter names are Llava's, so Llava state dicts load
unchanged.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModel, InstructBlipVisionConfig, InstructBlipVisionModel, LlavaForConditionalGeneration, LlavaModel
from transformers.cache_utils import Cache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava.modeling_llava import LlavaPreTrainedModel

from .attention import AttentionBackend, attention_backend_names, backend_running, check_requested, implementation_with_voco
from .configuration_voco_llava import VoCoLlavaConfig
from .image_inputs import ImageInputs, encode_images, vision_patch_features
from .projectors import projector_for
from .varlen import PLAN_KWARG, build_varlen_plan
from .voco_cache import VoCoCache
from .voco_generation import VoCoGenerationMixin
from .voco_mask import VoCoLayout, packed_sample_index

# EVA-ViT-G, LLaMA-VID's vision tower, is transformers' InstructBlipVisionModel, which AutoModel does not map
# (llamavid_original.py converts LLaMA-VID's tower into it); registered so that the vision tower is built from
# the config as any other
AutoModel.register(InstructBlipVisionConfig, InstructBlipVisionModel, exist_ok=True)


class VoCoLlavaModel(LlavaModel):
    config_class = VoCoLlavaConfig
    config: VoCoLlavaConfig

    def __init__(self, config: VoCoLlavaConfig):
        # Llava's parts, each built once (LlavaModel.__init__ would build a projector we would then replace:
        # under ZeRO-3's zero.Init that allocates and partitions it for nothing).
        LlavaPreTrainedModel.__init__(self, config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = projector_for(config).build(config)
        self.language_model = AutoModel.from_config(config.text_config)
        if config.voco_tokens > 0:
            # transformers' flash path keeps only padding and would drop the rule: the same kernel, through the
            # VoCo segment plan (attention.implementation_with_voco)
            text_config = self.language_model.config
            text_config._attn_implementation = implementation_with_voco(text_config._attn_implementation)
        self.post_init()

    def vision_patch_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[images, N, C]``: what precomputed frame features store (``image_inputs.vision_patch_features``)."""
        return vision_patch_features(self, pixel_values)

    def get_image_features(
        self,
        pixel_values: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        image_sizes: torch.Tensor | None = None,
        *,
        images: ImageInputs | None = None,
        **image_inputs,
    ) -> BaseModelOutputWithPooling:
        """transformers' hook for image features: ``pooler_output`` is each image's tokens for the LLM (a list of
        ``[tokens, D]``, in token order), made by the config's projector method (``image_inputs.encode_images``).
        Takes the forward's image inputs (or ``images``); the vision layer and strategy are the config's."""
        for name, value, configured in (
            ("vision_feature_layer", vision_feature_layer, self.config.vision_feature_layer),
            ("vision_feature_select_strategy", vision_feature_select_strategy, self.config.vision_feature_select_strategy),
        ):
            if value is not None and value != configured:
                raise ValueError(f"{name}={value!r}: this model's projector was trained on {configured!r}")
        if images is None:
            images = ImageInputs.from_forward(pixel_values, **image_inputs)
        return BaseModelOutputWithPooling(pooler_output=encode_images(self, images))

    def encode_images(self, pixel_values: torch.Tensor | None = None, **image_inputs) -> list[torch.Tensor]:
        """Each image's tokens for the LLM (``get_image_features(...).pooler_output``)."""
        return self.get_image_features(pixel_values, **image_inputs).pooler_output

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

    def attention_layout(
        self,
        input_ids: torch.LongTensor | None,  # [batch, n] the whole sequence, or the tokens after `cache_length`
        attention_mask: torch.Tensor | None,  # [batch, n] padding of input_ids
        *,
        cache: VoCoCache | None = None,
        cache_length: int | None = None,
        images: ImageInputs | None = None,
        position_ids: torch.Tensor | None = None,
        voco_mask: bool = True,
    ) -> VoCoLayout | None:
        """The layout the mask is made from, for the forward and for ``generate``'s steps alike; None when causal
        attention and padding are all there is.

        - ``input_ids`` continue a compressed ``cache`` (after its first ``cache_length`` positions, default all):
          the rule within the new tokens (an image compressed after others) and, in official mode, text kept off
          the cached prefix;
        - ``input_ids`` are a whole sequence: the rule, per sample in packed rows (``position_ids``);
        - the rule off (VoCo off, or ``voco_mask=False``: the lower bound's training, the distillation teacher):
          only "no token reads another sample" in packed rows.
        """
        voco = self.config.voco_tokens > 0 and voco_mask
        if cache is not None:
            if not voco or input_ids is None:
                return None
            new_has_images = bool(
                ((input_ids == self.config.image_token_id) | (input_ids == self.config.voco_token_id)).any()
            )
            if not new_has_images and self.config.voco_mask_mode == "paper":
                return None
            new_tokens = self.voco_layout(input_ids, attention_mask, images=images) if new_has_images else None
            return VoCoLayout.continuing(
                new_tokens,
                cache_length=cache.get_seq_length() if cache_length is None else cache_length,
                cache_first_voco=cache.first_voco_index(self.config.voco_token_id).to(attention_mask.device),
                batch_size=attention_mask.shape[0],
                query_length=input_ids.shape[1],
                mode=self.config.voco_mask_mode,
            )
        sample_index = packed_sample_index(position_ids)
        if voco:
            if input_ids is None:
                raise ValueError("VoCo needs input_ids (or a voco_layout) to find the image and VoCo tokens")
            return self.voco_layout(input_ids, attention_mask, images=images, sample_index=sample_index)
        return VoCoLayout.packed_only(sample_index, self.config.voco_mask_mode) if sample_index is not None else None

    def attention_backend(self) -> tuple[str, AttentionBackend | None]:
        """The language model's ``attn_implementation`` and its row of the backend table (None: one the table does
        not know)."""
        implementation = self.language_model.config._attn_implementation
        return implementation, backend_running(implementation)

    def prepare_attention(
        self,
        input_ids: torch.LongTensor | None,
        attention_mask: torch.Tensor | None,  # [batch, past + query] or [batch, query] padding, or None
        position_ids: torch.Tensor | None,
        past_key_values: Cache | None,
        voco_layout: VoCoLayout | None,
        images: ImageInputs | None,
        batch_size: int,
        query_length: int,
        device: torch.device,
        voco_mask: bool = True,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, dict]:
        """The one place attention is prepared: the layout (``attention_layout``, unless given), then what the
        backend takes, by its ``rule`` in the table (``attention.py``): a dense mask, a BlockMask, or a varlen
        plan. Returns ``(attention_mask, position_ids, extra forward keywords)``."""
        past_length = past_key_values.get_seq_length() if past_key_values is not None else 0
        continuing = isinstance(past_key_values, VoCoCache) and past_length > 0
        if continuing:
            # A compressed cache holds only what later tokens may read, and its positions run on past it.
            attention_mask, position_ids = past_key_values.continuation_inputs(
                batch_size, query_length, attention_mask, position_ids
            )
        if voco_layout is None:
            if past_length > 0 and not continuing and self.config.voco_tokens > 0 and voco_mask:
                raise ValueError(
                    "continuing from a cache with VoCo on needs voco_layout= the layout of the whole sequence "
                    "(VoCoLayout.from_input_ids on all ids so far), or a VoCoCache from model.compress(); "
                    "generate() passes the layout itself"
                )
            if continuing:
                voco_layout = self.attention_layout(
                    input_ids, attention_mask[:, -query_length:], cache=past_key_values, images=images,
                    voco_mask=voco_mask,
                )
            elif past_length == 0:
                voco_layout = self.attention_layout(
                    input_ids, attention_mask, images=images, position_ids=position_ids, voco_mask=voco_mask
                )
        if voco_layout is not None and not (voco_layout.has_voco and voco_mask or voco_layout.sample_index is not None):
            voco_layout = None  # the rule switched off, and no packed samples to keep apart
        implementation, backend = self.attention_backend()
        if backend is None or implementation != backend.implementation:
            # a kernel path the table does not prepare: transformers' own flash path (a model without VoCo, which
            # reads packed position ids itself), or an unknown backend, which cannot take the rule
            if voco_layout is not None and (voco_layout.has_voco or implementation != "flash_attention_2"):
                raise ValueError(
                    f"the VoCo mask cannot be expressed with attn_implementation={implementation!r} (it is not in the "
                    f"attention backend table, and its mask builder may ignore mask functions); use one of "
                    f"{', '.join(attention_backend_names())} or register it (llava_voco.model.attention)"
                )
            return attention_mask, position_ids, {}
        padding = attention_mask if attention_mask is not None and attention_mask.ndim == 2 else None
        if backend.rule == "varlen":
            # no mask at all: the rule (or plain causal attention) as varlen segments, padding never computed
            plan = build_varlen_plan(voco_layout, padding, batch_size=batch_size, q_offset=past_length,
                                     q_length=query_length, device=device)
            return attention_mask, position_ids, {PLAN_KWARG: plan}
        if voco_layout is None:
            return attention_mask, position_ids, {}
        dtype = self.get_input_embeddings().weight.dtype
        if backend.rule == "dense":
            # The rule evaluated by broadcasting (VoCoLayout.dense_mask), in the format sdpa_mask / eager_mask
            # give: what create_causal_mask would build, without its per-element vmap (costly per call).
            allowed = voco_layout.dense_mask(padding, q_offset=past_length, q_length=query_length)
            if not backend.additive_mask:
                return allowed, position_ids, {}  # [batch, 1, query, past + query] bool
            zero = torch.zeros((), dtype=dtype, device=allowed.device)
            return torch.where(allowed, zero, torch.finfo(dtype).min), position_ids, {}
        shape_only = torch.empty((batch_size, query_length, 0), dtype=dtype, device=device)
        block_mask = create_causal_mask(
            config=self.language_model.config,
            inputs_embeds=shape_only,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            position_ids=position_ids,
            and_mask_function=voco_layout.mask_function(),
        )
        return block_mask, position_ids, {}

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
        voco_mask: bool = True,
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
        voco_mask (`bool`, defaults to `True`):
            False: the VoCo tokens stay in the sequence but attention is plain causal (packed samples still kept
            apart), so text reads the vision tokens. For training the VoCo paper's lower bound
            (`--voco_mask_in_training False`) and for the distillation teacher; a checkpoint always runs with
            the mask unless asked.
        """
        images = ImageInputs.from_forward(
            pixel_values, frame_features, frame_features_mask, video_frame_mask,
            instruction_input_ids, instruction_attention_mask,
        )
        if attention_mask is None or attention_mask.ndim != 4:  # a 4D mask is used as given
            sequence = input_ids if input_ids is not None else inputs_embeds
            attention_mask, position_ids, attention_inputs = self.prepare_attention(
                input_ids, attention_mask, position_ids, past_key_values, voco_layout, images,
                batch_size=sequence.shape[0], query_length=sequence.shape[1], device=sequence.device,
                voco_mask=voco_mask,
            )
            kwargs.update(attention_inputs)
        if images is not None:
            # Llava's extension point for image features computed outside it: it scatters them into the
            # image tokens (and checks their count).
            kwargs["mm_encoder_outputs"] = {"image": self.get_image_features(images=images)}  # per image [tokens, D]
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
        """``from_pretrained``; a backend of the table (``attention.py``) whose package is missing (flash-attn) is
        refused here, before any weight is read, naming what installs it."""
        check_requested(attn_implementation)
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
        voco_mask: bool = True,
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
            "voco_mask": None if voco_mask else False,
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
