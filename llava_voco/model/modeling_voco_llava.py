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
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.masking_utils import (
    ALL_MASK_ATTENTION_FUNCTIONS,
    create_causal_mask,
    eager_mask,
    flex_attention_mask,
    sdpa_mask,
)

from .configuration_voco_llava import VoCoLlavaConfig
from .projector import build_projector, projector_input_size
from .voco_cache import VoCoCache, VoCoCacheError, model_fingerprint
from .voco_mask import VoCoLayout

# Mask builders that honour a mask function. flash-attn's builder only keeps padding, so it would
# silently drop the VoCo rule: its varlen path is a separate backend (DESIGN 2.5).
_MASK_BUILDERS_WITH_MASK_FUNCTION = (sdpa_mask, eager_mask, flex_attention_mask)


class VoCoLlavaModel(LlavaModel):
    config_class = VoCoLlavaConfig
    config: VoCoLlavaConfig

    def __init__(self, config: VoCoLlavaConfig):
        super().__init__(config)
        # False only to train the VoCo paper's lower bound (``--voco_mask_in_training False``): VoCo tokens in
        # the sequence but plain causal attention, so text learns to read the vision tokens; the saved model
        # is then evaluated with the mask. Not a config field: a checkpoint always loads with the mask on.
        self.apply_voco_mask = True
        if getattr(config, "mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
            self.multi_modal_projector = build_projector(config)
            self.post_init()

    def voco_layout(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        frame_features: torch.Tensor | None = None,
        frame_features_mask: torch.Tensor | None = None,
    ) -> VoCoLayout | None:
        """The layout of the full sequence in ``input_ids``, or None when VoCo is off."""
        if self.config.voco_tokens == 0:
            return None
        num_images = tokens_per_image = None
        precomputed = self.precomputed_frame_mask(pixel_values, frame_features, frame_features_mask)
        if precomputed is not None:
            num_images = len(precomputed)
        elif pixel_values is not None:
            num_images = len(image_sizes) if image_sizes is not None else pixel_values.shape[0]
        if num_images is not None:
            # LLaMA-VID images and video frames may differ in size; Llava's total count check still holds
            if image_sizes is None and num_images and self.config.mm_projector_type != "llamavid":
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

    def vision_patch_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[images, N, C]``: the selected vision layer's patch features (what LLaMA-VID reads and
        ``scripts/extract_video_features.py`` stores), ``frame_chunk`` images through the tower at a time."""
        chunks = []
        for start in range(0, pixel_values.shape[0], self.config.frame_chunk):
            hidden = self.vision_tower(pixel_values[start : start + self.config.frame_chunk], output_hidden_states=True)
            selected = hidden.hidden_states[self.config.vision_feature_layer]
            chunks.append(selected[:, 1:] if self.config.vision_feature_select_strategy == "default" else selected)
        return torch.cat(chunks)

    @staticmethod
    def precomputed_frame_mask(
        pixel_values: torch.Tensor | None,
        frame_features: torch.Tensor | None,
        frame_features_mask: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """``[images]`` True for the images given as ``frame_features`` (None when there are none).

        Images are numbered in the order of their tokens; ``pixel_values`` hold the others, in order. The
        mask may be left out when every image is a precomputed frame."""
        if frame_features is None:
            return None
        if frame_features_mask is None:
            if pixel_values is not None:
                raise ValueError(
                    "pixel_values and frame_features together need frame_features_mask: which images (in token "
                    "order) are the precomputed frames"
                )
            return torch.ones(len(frame_features), dtype=torch.bool, device=frame_features.device)
        precomputed = frame_features_mask.bool()
        with_pixels = len(pixel_values) if pixel_values is not None else 0
        if int(precomputed.sum()) != len(frame_features) or int((~precomputed).sum()) != with_pixels:
            raise ValueError(
                f"frame_features_mask marks {int(precomputed.sum())} precomputed frame(s) and "
                f"{int((~precomputed).sum())} image(s) with pixels, but {len(frame_features)} frame_features and "
                f"{with_pixels} pixel_values were given"
            )
        return precomputed

    def checked_frame_features(self, frame_features: torch.Tensor) -> torch.Tensor:
        """``frame_features`` on the vision tower's device and dtype; another width or rank is refused (they
        must be what ``vision_patch_features`` gives, e.g. written by ``scripts/extract_video_features.py``)."""
        width = projector_input_size(self.config)
        if frame_features.ndim != 3 or frame_features.shape[-1] != width:
            raise ValueError(
                f"frame_features must be [frames, patches, {width}] (this model's vision tower's patch features), "
                f"got {tuple(frame_features.shape)} (extracted with another vision tower?)"
            )
        tower = next(self.vision_tower.parameters())
        return frame_features.to(tower.device, tower.dtype)

    def image_patch_features(
        self,
        pixel_values: torch.Tensor | None,  # [images with pixels, 3, H, W]
        frame_features: torch.Tensor | None = None,  # [precomputed frames, N, C]
        frame_features_mask: torch.Tensor | None = None,  # [images] True for the precomputed frames
    ) -> torch.Tensor:
        """``[images, N, C]``: every image's patch features, from the vision tower, or as given for the
        precomputed frames (which skip the tower)."""
        precomputed = self.precomputed_frame_mask(pixel_values, frame_features, frame_features_mask)
        if precomputed is None:
            return self.vision_patch_features(pixel_values)
        frame_features = self.checked_frame_features(frame_features)
        if pixel_values is None:
            return frame_features
        from_pixels = self.vision_patch_features(pixel_values)  # [images with pixels, N, C]
        if from_pixels.shape[1] != frame_features.shape[1]:
            raise ValueError(
                f"frame_features have {frame_features.shape[1]} patches per frame, the images' pixels give "
                f"{from_pixels.shape[1]} (extracted at another image size?)"
            )
        patch_features = from_pixels.new_empty(len(precomputed), *from_pixels.shape[1:])
        patch_features[~precomputed.to(patch_features.device)] = from_pixels
        patch_features[precomputed.to(patch_features.device)] = frame_features
        return patch_features

    def project_frame_features(self, frame_features: torch.Tensor) -> list[torch.Tensor]:
        """Per precomputed frame, its tokens for the LLM through a ``linear`` / ``mlp2x_gelu`` projector:
        what ``encode_images`` gives for its pixels, without the vision tower."""
        frame_features = self.checked_frame_features(frame_features)  # [frames, N, C]
        features = []
        for start in range(0, len(frame_features), self.config.frame_chunk):
            patch_features = frame_features[start : start + self.config.frame_chunk]
            if self.config.vision_token_pooling != "none":
                from .llamavid import pool_patches

                patch_features = pool_patches(patch_features, self.config.vision_token_pooling)  # [frames, n, C]
            features.extend(self.multi_modal_projector(patch_features))
        return features

    def images_in(
        self,
        images: slice,
        pixel_values: torch.Tensor | None,
        frame_features: torch.Tensor | None = None,
        frame_features_mask: torch.Tensor | None = None,
    ) -> dict:
        """``pixel_values`` / ``frame_features`` / ``frame_features_mask`` of the images in ``images`` (a
        range of image numbers), for encoding a few images of a long video at a time."""
        precomputed = self.precomputed_frame_mask(pixel_values, frame_features, frame_features_mask)
        if precomputed is None:
            return {"pixel_values": pixel_values[images] if pixel_values is not None else None}
        start, stop, _ = images.indices(len(precomputed))
        frames_before = [int(precomputed[:start].sum()), int(precomputed[:stop].sum())]
        pixels_before = [start - frames_before[0], stop - frames_before[1]]
        selected = precomputed[start:stop]
        return {
            "pixel_values": pixel_values[slice(*pixels_before)] if pixels_before[1] > pixels_before[0] else None,
            "frame_features": frame_features[slice(*frames_before)] if frames_before[1] > frames_before[0] else None,
            "frame_features_mask": selected if bool(selected.any()) else None,
        }

    def llamavid_image_features(
        self,
        pixel_values: torch.Tensor | None,  # [images with pixels, 3, H, W]
        instruction_input_ids: torch.LongTensor,  # [images, L] text decoder tokens of each image's instruction
        instruction_attention_mask: torch.Tensor,  # [images, L]
        video_frame_mask: torch.Tensor | None = None,  # [images] True for frames of a video
        frame_features: torch.Tensor | None = None,  # [precomputed frames, N, C]
        frame_features_mask: torch.Tensor | None = None,  # [images] True for the precomputed frames
    ) -> list[torch.Tensor]:
        """Per image, ``[1 + content, D]``: LLaMA-VID's context and content tokens (DESIGN 3).

        Images go through the vision tower ``frame_chunk`` at a time, so long videos keep memory flat;
        frames given as ``frame_features`` skip it."""
        if instruction_input_ids is None or instruction_attention_mask is None:
            raise ValueError(
                "mm_projector_type='llamavid' needs instruction_input_ids / instruction_attention_mask: "
                "each image's instruction tokenized with the text decoder's tokenizer"
            )
        chunk = self.config.frame_chunk
        patch_features = self.image_patch_features(pixel_values, frame_features, frame_features_mask)  # [images, N, C]
        if instruction_input_ids.shape[0] != patch_features.shape[0]:
            raise ValueError(
                f"{patch_features.shape[0]} image(s) but {instruction_input_ids.shape[0]} instruction(s): "
                "LLaMA-VID needs one instruction per image or frame"
            )
        is_frame = (
            video_frame_mask.bool()
            if video_frame_mask is not None
            else torch.zeros(len(patch_features), dtype=torch.bool, device=patch_features.device)
        )
        features: list[torch.Tensor | None] = [None] * len(patch_features)
        for frames, spec in ((~is_frame, self.config.llamavid_compress_type), (is_frame, self.config.llamavid_video_compress_type)):
            rows = frames.nonzero().squeeze(1)
            if len(rows) == 0:
                continue
            tokens = self.multi_modal_projector(
                patch_features[rows], instruction_input_ids[rows], instruction_attention_mask[rows],
                compress_type=spec, frame_chunk=chunk,
            )
            for row, image_tokens in zip(rows.tolist(), tokens):
                features[row] = image_tokens
        return features

    def encode_images(
        self,
        pixel_values: torch.Tensor | None,
        image_sizes=None,
        frame_features: torch.Tensor | None = None,
        frame_features_mask: torch.Tensor | None = None,
        **image_inputs,
    ) -> list[torch.Tensor]:
        """Each image's (or frame's) features for the LLM, ``frame_chunk`` images through the tower at a time.

        Frames given as ``frame_features`` (``[frames, N, C]``, precomputed patch features) skip the tower and
        get the tokens their pixels would; ``frame_features_mask`` (``[images]``) says which images they are."""
        if self.config.mm_projector_type == "llamavid":
            return self.llamavid_image_features(
                pixel_values, image_inputs.get("instruction_input_ids"), image_inputs.get("instruction_attention_mask"),
                image_inputs.get("video_frame_mask"), frame_features=frame_features,
                frame_features_mask=frame_features_mask,
            )
        precomputed = self.precomputed_frame_mask(pixel_values, frame_features, frame_features_mask)
        if precomputed is not None:
            from_pixels = iter(self.encode_images(pixel_values, image_sizes) if pixel_values is not None else [])
            from_features = iter(self.project_frame_features(frame_features))
            return [next(from_features) if is_precomputed else next(from_pixels)
                    for is_precomputed in precomputed.tolist()]
        features = []
        if self.config.vision_token_pooling != "none":  # pooled before the projector, as LLaMA-VID's content tokens
            from .llamavid import pool_patches

            for start in range(0, pixel_values.shape[0], self.config.frame_chunk):
                patch_features = self.vision_patch_features(pixel_values[start : start + self.config.frame_chunk])
                pooled_features = pool_patches(patch_features, self.config.vision_token_pooling)  # [images, n, C]
                features.extend(self.multi_modal_projector(pooled_features))
            return features
        for start in range(0, pixel_values.shape[0], self.config.frame_chunk):
            chunk_sizes = image_sizes[start : start + self.config.frame_chunk] if image_sizes is not None else None
            output = self.get_image_features(
                pixel_values=pixel_values[start : start + self.config.frame_chunk],
                vision_feature_layer=self.config.vision_feature_layer,
                vision_feature_select_strategy=self.config.vision_feature_select_strategy,
                image_sizes=chunk_sizes,
                return_dict=True,
            )
            features.extend(output.pooler_output)
        return features

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
        if builder in (sdpa_mask, eager_mask) and (attention_mask is None or attention_mask.ndim == 2):
            # The rule evaluated by broadcasting (VoCoLayout.dense_mask), in the format sdpa_mask / eager_mask
            # give: what create_causal_mask would build, without its per-element vmap (costly per call).
            past_length = past_key_values.get_seq_length() if past_key_values is not None else 0
            allowed = voco_layout.dense_mask(attention_mask, q_offset=past_length, q_length=query_length)
            if builder is sdpa_mask:
                return allowed
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
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
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
        instruction_input_ids, instruction_attention_mask, video_frame_mask:
            LLaMA-VID only: each image's instruction for the text decoder, and which images are video frames.
        frame_features (`torch.Tensor` of shape `(frames, patches, vision_hidden_size)`, *optional*):
            Video frames given as precomputed patch features (`vision_patch_features`: the selected vision
            layer, CLS dropped under the "default" strategy; `scripts/extract_video_features.py` writes them)
            in place of pixels: the vision tower is skipped for them, the tokens are those of their pixels.
        frame_features_mask (`torch.BoolTensor` of shape `(images,)`, *optional*):
            Which images, in token order, are `frame_features` (the others are `pixel_values`, in order).
            Needed only when both are given.
        voco_layout (`VoCoLayout`, *optional*):
            Layout of the whole sequence (cached tokens included). Derived from `input_ids` when they are
            the whole sequence; `generate` passes it at every step. Needed when continuing from a cache.
        """
        mask_is_4d = attention_mask is not None and attention_mask.ndim == 4
        past_length = past_key_values.get_seq_length() if past_key_values is not None else 0
        if isinstance(past_key_values, VoCoCache) and past_length > 0 and not mask_is_4d:
            # Continuing a compressed cache: it holds only what later tokens may read, so the new tokens
            # see all of it; the rule applies within the new tokens (an image compressed after others).
            new_tokens = input_ids if input_ids is not None else inputs_embeds
            batch_size, query_length = new_tokens.shape[:2]
            if past_key_values.batch_size != batch_size:
                raise VoCoCacheError(
                    f"the VoCoCache holds {past_key_values.batch_size} row(s), the input has {batch_size}; "
                    "use cache.repeat_rows(...) or generate(), which does it for you"
                )
            if attention_mask is None or attention_mask.shape[1] == query_length:
                new_mask = attention_mask if attention_mask is not None else new_tokens.new_ones(batch_size, query_length)
                attention_mask = past_key_values.attention_mask_with(new_mask.long())
            elif attention_mask.shape[1] != past_length + query_length:
                raise ValueError(
                    f"attention_mask covers {attention_mask.shape[1]} positions; with a VoCoCache of {past_length} "
                    f"it must cover the new {query_length} tokens or cache + new ({past_length + query_length})"
                )
            if position_ids is None:
                position_ids = past_key_values.position_ids_for(attention_mask, query_length)
            new_has_images = input_ids is not None and bool(
                ((input_ids == self.config.image_token_id) | (input_ids == self.config.voco_token_id)).any()
            )
            if voco_layout is None and self.config.voco_tokens > 0 and new_has_images:
                new_layout = self.voco_layout(
                    input_ids, attention_mask[:, -query_length:], pixel_values, kwargs.get("image_sizes"),
                    frame_features, frame_features_mask,
                )
                voco_layout = new_layout.after_cache(past_length)
            if voco_layout is not None and voco_layout.has_voco:
                attention_mask = self.voco_attention_mask(
                    voco_layout, query_length, batch_size, attention_mask, past_key_values, position_ids
                )
        elif self.config.voco_tokens > 0 and self.apply_voco_mask and not mask_is_4d:
            if voco_layout is None:
                if input_ids is None:
                    raise ValueError("VoCo needs input_ids (or a voco_layout) to find the image and VoCo tokens")
                if past_length > 0:
                    raise ValueError(
                        "continuing from a cache with VoCo on needs voco_layout= the layout of the whole "
                        "sequence (VoCoLayout.from_input_ids on all ids so far), or a VoCoCache from "
                        "model.compress(); generate() passes the layout itself"
                    )
                voco_layout = self.voco_layout(
                    input_ids, attention_mask, pixel_values, kwargs.get("image_sizes"),
                    frame_features, frame_features_mask,
                )
            if voco_layout is not None and voco_layout.has_voco:
                batch_size, query_length = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
                attention_mask = self.voco_attention_mask(
                    voco_layout, query_length, batch_size, attention_mask, past_key_values, position_ids
                )
        pooled = self.config.mm_projector_type == "llamavid" or self.config.vision_token_pooling != "none"
        if (pooled and pixel_values is not None) or frame_features is not None:
            # Llava's extension point for precomputed image features: it scatters them into the image tokens.
            image_features = self.encode_images(
                pixel_values,
                image_sizes=kwargs.get("image_sizes"),
                frame_features=frame_features,
                frame_features_mask=frame_features_mask,
                instruction_input_ids=instruction_input_ids,
                instruction_attention_mask=instruction_attention_mask,
                video_frame_mask=video_frame_mask,
            )
            kwargs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=image_features)}
            pixel_values = None
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

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None, **kwargs):
        """Decoding steps only see their new token: give them the layout of the whole sequence, or, when
        continuing a VoCoCache, the original position ids (text resumes after the dropped vision)."""
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, past_key_values=past_key_values, attention_mask=attention_mask, **kwargs
        )
        if not kwargs.get("is_first_iteration") and kwargs.get("use_cache", True):
            # like pixel_values, precomputed frames are read by the prefill only
            model_inputs.pop("frame_features", None)
            model_inputs.pop("frame_features_mask", None)
        if isinstance(past_key_values, VoCoCache):
            # input_ids are every token after the cache's described part (generate's own bookkeeping)
            if attention_mask is None:  # generate drops an all-ones mask
                described = past_key_values.attention_mask.to(input_ids.device).expand(input_ids.shape[0], -1)
                attention_mask = torch.cat([described, torch.ones_like(input_ids)], dim=1)
            query_length = model_inputs["input_ids"].shape[1]
            model_inputs["position_ids"] = past_key_values.position_ids_for(attention_mask, query_length)
        elif self.config.voco_tokens > 0 and input_ids is not None and input_ids.shape[1] > 0:
            if attention_mask is None or attention_mask.ndim == 2:
                model_inputs["voco_layout"] = self.model.voco_layout(
                    input_ids, attention_mask, model_inputs.get("pixel_values"), model_inputs.get("image_sizes"),
                    model_inputs.get("frame_features"), model_inputs.get("frame_features_mask"),
                )
        return model_inputs

    @torch.no_grad()
    def compress(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        frame_features: torch.Tensor | None = None,
        frame_features_mask: torch.Tensor | None = None,
        **image_inputs,
    ) -> VoCoCache:
        """Prefill a prompt that contains images and keep only what later text may read (DESIGN 2.3).

        ``input_ids`` is the prompt up to (and possibly a little past) the last VoCo token, as
        ``VoCoLlavaProcessor`` lays it out; a batch gives a batched cache (rows left padded). A prompt with
        several images is compressed one image at a time, each image's vision keys/values dropped as soon as
        its VoCo tokens are computed, so the cache peaks at prefix + VoCo so far + one image.
        ``image_inputs`` are per-image inputs (rows follow the images: ``video_frame_mask``, and for LLaMA-VID
        ``instruction_input_ids`` / ``instruction_attention_mask``). Video frames may be given as precomputed
        ``frame_features`` (see ``VoCoLlavaModel.forward``), read a chunk at a time like pixels.
        """
        if self.config.voco_tokens == 0:
            raise ValueError("compress() needs a model with voco_tokens > 0")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        layout = self.model.voco_layout(
            input_ids, attention_mask, pixel_values, image_sizes, frame_features, frame_features_mask
        )
        fingerprint = model_fingerprint(self)
        images_before = torch.cat([layout.num_images.new_zeros(1), layout.num_images.cumsum(0)])
        rows = []
        for row in range(input_ids.shape[0]):
            real = attention_mask[row].bool()
            row_ids = input_ids[row, real][None]  # [1, n]
            row_images = slice(int(images_before[row]), int(images_before[row + 1]))
            row_media = self.model.images_in(row_images, pixel_values, frame_features, frame_features_mask)
            row_inputs = {name: value[row_images] for name, value in image_inputs.items() if value is not None}
            rows.append(self._compress_row(row_ids, row_media, fingerprint, row_inputs))
        pad_token_id = self.config.text_config.pad_token_id or 0
        return rows[0] if len(rows) == 1 else VoCoCache.concatenate(rows, pad_token_id=pad_token_id)

    def _compress_row(
        self, input_ids: torch.LongTensor, media: dict, fingerprint: str, image_inputs: dict
    ) -> VoCoCache:
        """One prompt (no padding): prefill image by image, dropping what the rule hides from later tokens.
        ``media``: its ``pixel_values`` / ``frame_features`` / ``frame_features_mask`` (``images_in``)."""
        layout = self.model.voco_layout(input_ids)
        length = input_ids.shape[1]
        # Segment ends: after each image's last VoCo token, and the end of the prompt.
        voco_ends = layout.key_visible_until[0][input_ids[0] == self.config.image_token_id].unique() + 1
        ends = sorted(set(voco_ends.tolist()) | {length})
        cache = VoCoCache(
            config=self.config.text_config,
            voco_tokens=self.config.voco_tokens,
            mask_mode=self.config.voco_mask_mode,
            fingerprint=fingerprint,
        )
        cached_positions = torch.zeros(0, dtype=torch.long, device=input_ids.device)
        zero = torch.zeros((), dtype=torch.long, device=input_ids.device)
        # Images go through the vision tower frame_chunk at a time (a video's frames batch well), a chunk
        # only when the LLM reaches it; the LLM reads one image at a time so that its vision keys/values
        # are dropped before the next: memory stays flat however long the video.
        chunk = self.config.frame_chunk
        encoded, encoded_from = [], 0
        num_images = len(voco_ends) if any(value is not None for value in media.values()) else 0
        start = 0
        for image, end in enumerate(ends):
            segment = input_ids[:, start:end]
            segment_inputs = {}
            if image < num_images:
                if image >= encoded_from + len(encoded):
                    rows = slice(image, image + chunk)
                    encoded_from = image
                    encoded = self.model.encode_images(
                        **self.model.images_in(rows, **media),
                        **{name: value[rows] for name, value in image_inputs.items()},
                    )
                segment_inputs["mm_encoder_outputs"] = {
                    "image": BaseModelOutputWithPooling(pooler_output=[encoded[image - encoded_from]])
                }
            self(
                input_ids=segment,
                **segment_inputs,
                past_key_values=cache,
                position_ids=torch.arange(start, end, device=input_ids.device)[None],
                use_cache=True,
                logits_to_keep=1,
            )
            cached_positions = torch.cat([cached_positions, torch.arange(start, end, device=input_ids.device)])
            # What the next token (at `end`) may read, by the rule; only the cached positions are asked.
            keep = layout.full_mask_function()(zero, zero, torch.tensor(end, device=zero.device), cached_positions)
            if not bool(keep.all()):
                for layer in cache.layers:
                    layer.keys, layer.values = layer.keys[:, :, keep], layer.values[:, :, keep]
                cached_positions = cached_positions[keep]
            # Between segments the cache holds exactly what the next forward may read, described here.
            cache.token_ids = input_ids[:, cached_positions]
            cache.attention_mask = torch.ones_like(cache.token_ids)
            cache.next_position = torch.tensor([end], device=input_ids.device)
            start = end
        cache.num_images = layout.num_images.clone()
        cache.vision_tokens_dropped = (input_ids == self.config.image_token_id).sum(1)
        return cache

    def generate(self, inputs=None, *, past_key_values=None, keep_turn: bool = False, **kwargs):
        """transformers' generate; from a ``VoCoCache`` (``model.compress``), pass only the new text.

        The cache is copied unless ``keep_turn=True``, which extends it with this turn (question and
        answer) for a multi-turn conversation; one cache row answers a whole batch of questions.
        """
        if not isinstance(past_key_values, VoCoCache):
            if keep_turn:
                raise ValueError("keep_turn=True needs past_key_values=a VoCoCache")
            return super().generate(inputs, past_key_values=past_key_values, **kwargs)
        input_ids = inputs if inputs is not None else kwargs.pop("input_ids")
        attention_mask = kwargs.pop("attention_mask", None)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        cache = past_key_values
        if cache.get_seq_length() != cache.described_length:
            raise VoCoCacheError("this VoCoCache was extended outside generate(); use a fresh or kept cache")
        batch_size = input_ids.shape[0]
        if keep_turn and cache.batch_size != batch_size:
            raise VoCoCacheError(f"keep_turn needs one question per cache row ({cache.batch_size}), got {batch_size}")
        if not keep_turn:
            cache = cache.clone()
        if cache.batch_size == 1 and batch_size > 1:
            cache = cache.repeat_rows(torch.zeros(batch_size, dtype=torch.long))
        elif cache.batch_size != batch_size:
            raise VoCoCacheError(f"the VoCoCache holds {cache.batch_size} rows, got {batch_size} questions")
        full_attention_mask = cache.attention_mask_with(attention_mask.long())
        output = super().generate(
            input_ids=input_ids, attention_mask=full_attention_mask, past_key_values=cache, **kwargs
        )
        if keep_turn:
            sequences = output if isinstance(output, torch.Tensor) else output.sequences
            self._keep_turn(cache, sequences, attention_mask, kwargs.get("eos_token_id"))
        return output

    @torch.no_grad()
    def _keep_turn(self, cache: VoCoCache, sequences, question_mask, eos_token_id=None) -> None:
        """Make ``cache`` describe question + answer; feeds the last token, which generate never forwards."""
        question_length = question_mask.shape[1]
        answer = sequences[:, question_length:]
        eos = eos_token_id if eos_token_id is not None else self.generation_config.eos_token_id
        eos = torch.tensor(eos if isinstance(eos, (list, tuple)) else [eos], device=answer.device)
        is_eos = torch.isin(answer, eos).long()
        after_eos = (is_eos.cumsum(1) - is_eos) > 0  # tokens after the first EOS: padding of finished rows
        answer_mask = (~after_eos).long()
        new_ids = torch.cat([sequences[:, :question_length], answer], dim=1)
        new_mask = torch.cat([question_mask.long(), answer_mask], dim=1)
        if answer.shape[1] > 0:
            full_mask = torch.cat([cache.attention_mask, new_mask], dim=1)
            self(input_ids=answer[:, -1:], attention_mask=full_mask, past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache.next_position = cache.next_position + new_mask.sum(1)
        cache.token_ids = torch.cat([cache.token_ids, new_ids], dim=1)
        cache.attention_mask = torch.cat([cache.attention_mask, new_mask], dim=1)


__all__ = ["VoCoLlavaModel", "VoCoLlavaForConditionalGeneration"]
