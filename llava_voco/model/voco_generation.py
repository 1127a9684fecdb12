"""Compress once, answer many: the inference API of a VoCo model (docs/design.md §2.3).

``compress`` prefills a prompt's images and keeps, in a :class:`VoCoCache`, only what later text may read;
``generate`` answers from such a cache (copying it, or extending it with the turn for a multi-turn chat).
A mixin of ``VoCoLlavaForConditionalGeneration``, kept beside the cache rather than in the model file.
"""

from __future__ import annotations

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .image_inputs import ImageInputs
from .voco_cache import VoCoCache, VoCoCacheError, model_fingerprint


class VoCoGenerationMixin:
    """``compress`` / ``generate`` / ``keep_turn`` for ``VoCoLlavaForConditionalGeneration``."""

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
        cache = past_key_values if isinstance(past_key_values, VoCoCache) else None
        if cache is not None:
            # input_ids are every token after the cache's described part (generate's own bookkeeping)
            if attention_mask is None:  # generate drops an all-ones mask
                described = cache.attention_mask.to(input_ids.device).expand(input_ids.shape[0], -1)
                attention_mask = torch.cat([described, torch.ones_like(input_ids)], dim=1)
            query_length = model_inputs["input_ids"].shape[1]
            model_inputs["position_ids"] = cache.position_ids_for(attention_mask, query_length)
        if input_ids is None or input_ids.shape[1] == 0 or (attention_mask is not None and attention_mask.ndim != 2):
            return model_inputs
        # The layout of every token so far, as the forward would make it (the decoding steps see only their own
        # token): after a cache, an image in the question stays hidden from the answer after its VoCo tokens.
        layout = self.model.attention_layout(
            input_ids,
            attention_mask[:, -input_ids.shape[1]:] if cache is not None else attention_mask,
            cache=cache,
            cache_length=cache.described_length if cache is not None else None,
            images=None if cache is not None else ImageInputs.from_forward(
                model_inputs.get("pixel_values"), model_inputs.get("frame_features"),
                model_inputs.get("frame_features_mask"), model_inputs.get("video_frame_mask"),
            ),
        )
        if layout is not None:
            model_inputs["voco_layout"] = layout
        return model_inputs

    @torch.no_grad()
    def compress(
        self,
        input_ids: torch.LongTensor,  # [batch, seq] prompts up to (and possibly a little past) their last VoCo token
        pixel_values: torch.Tensor | None = None,  # [images with pixels, 3, H, W]
        attention_mask: torch.Tensor | None = None,  # [batch, seq], rows left padded
        image_sizes: torch.Tensor | None = None,  # accepted for LlavaProcessor outputs; the counts come from the config
        frame_features: torch.Tensor | None = None,  # [precomputed frames, N, C]
        frame_features_mask: torch.Tensor | None = None,  # [images] True for the precomputed frames
        video_frame_mask: torch.Tensor | None = None,  # [images] True for video frames
        instruction_input_ids: torch.Tensor | None = None,  # [images, L] LLaMA-VID: each image's instruction
        instruction_attention_mask: torch.Tensor | None = None,  # [images, L]
        voco_tokens: int | None = None,  # an elastic model's k (the prompt's VoCo runs must have it)
    ) -> VoCoCache:
        """Prefill prompts that contain images and keep only what later text may read.

        ``input_ids`` are laid out by ``VoCoLlavaProcessor``; a batch gives a batched cache (rows left padded).
        A prompt with several images is compressed one image at a time, each image's vision keys/values
        dropped as soon as its VoCo tokens are computed, so the cache peaks at prefix + VoCo so far + one
        image. LLaMA-VID's context tokens read each image's instruction (pass the processor's
        ``instruction_input_ids`` / ``instruction_attention_mask``, made from the question, as in training).
        An elastic model compresses with any of its VoCo counts (``processor(..., voco_tokens=k)``); the
        cache records the k it was made with.
        """
        if self.config.voco_tokens == 0:
            raise ValueError("compress() needs a model with voco_tokens > 0")
        if voco_tokens is not None:
            self.config.check_voco_tokens(voco_tokens)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        images = ImageInputs.from_forward(
            pixel_values, frame_features, frame_features_mask, video_frame_mask,
            instruction_input_ids, instruction_attention_mask,
        )
        layout = self.model.voco_layout(input_ids, attention_mask, images=images)
        if voco_tokens is not None and int(layout.num_images.sum()) > 0:
            per_image = ((input_ids == self.config.voco_token_id) & attention_mask.bool()).sum() // layout.num_images.sum()
            if int(per_image) != voco_tokens:
                raise ValueError(f"compress(voco_tokens={voco_tokens}) but the prompt's images have {int(per_image)} "
                                 f"VoCo tokens each: lay it out with processor(..., voco_tokens={voco_tokens})")
        fingerprint = model_fingerprint(self)
        images_before = torch.cat([layout.num_images.new_zeros(1), layout.num_images.cumsum(0)]).tolist()
        rows = []
        for row in range(input_ids.shape[0]):
            row_ids = input_ids[row, attention_mask[row].bool()][None]  # [1, n]
            row_images = images.select(slice(images_before[row], images_before[row + 1])) if images else None
            rows.append(self._compress_row(row_ids, row_images, fingerprint))
        if len(rows) == 1:
            return rows[0]
        return VoCoCache.concatenate(rows, pad_token_id=self._pad_token_id())

    def _pad_token_id(self) -> int:
        for pad in (self.generation_config.pad_token_id, self.config.text_config.pad_token_id,
                    self.generation_config.eos_token_id):
            if isinstance(pad, (list, tuple)):
                pad = pad[0] if pad else None
            if pad is not None:
                return int(pad)
        raise ValueError("batching caches of different lengths needs a pad (or eos) token id in the model's config")

    def _compress_row(self, input_ids: torch.LongTensor, images: ImageInputs | None, fingerprint: str) -> VoCoCache:
        """One prompt (``[1, n]``, no padding): prefill image by image, dropping what no later token may read."""
        layout = self.model.voco_layout(input_ids)
        length = input_ids.shape[1]
        device = input_ids.device
        # Segment ends: after each image's last VoCo token, and the end of the prompt.
        voco_ends = layout.key_visible_until[0][input_ids[0] == self.config.image_token_id].unique() + 1
        ends = sorted(set(voco_ends.tolist()) | {length})
        # the k these images were laid out with (an elastic model has several)
        is_voco = input_ids[0] == self.config.voco_token_id
        voco_tokens = int(is_voco.sum()) // len(voco_ends) if len(voco_ends) else self.config.voco_tokens
        cache = VoCoCache(
            config=self.config.text_config,
            voco_tokens=voco_tokens,
            mask_mode=self.config.voco_mask_mode,
            fingerprint=fingerprint,
        )
        cached_positions = torch.zeros(0, dtype=torch.long, device=device)
        # Images go through the vision tower frame_chunk at a time (a video's frames batch well), a chunk only
        # when the LLM reaches it; the LLM reads one image at a time so that its vision keys/values are dropped
        # before the next: memory stays flat however long the video.
        chunk = self.config.frame_chunk
        encoded, encoded_from = [], 0
        num_images = len(voco_ends) if images else 0
        start = 0
        for image, end in enumerate(ends):
            segment_inputs = {}
            if image < num_images:
                if image >= encoded_from + len(encoded):
                    encoded_from = image
                    encoded = self.model.get_image_features(images=images.select(slice(image, image + chunk))).pooler_output
                segment_inputs["mm_encoder_outputs"] = {
                    "image": BaseModelOutputWithPooling(pooler_output=[encoded[image - encoded_from]])
                }
            self(
                input_ids=input_ids[:, start:end],
                **segment_inputs,
                past_key_values=cache,
                position_ids=torch.arange(start, end, device=device)[None],
                use_cache=True,
                logits_to_keep=1,
            )
            cached_positions = torch.cat([cached_positions, torch.arange(start, end, device=device)])
            # Keep every key some later token may read: all but the vision keys of images whose VoCo tokens
            # are done. (official mode: text may not read the prefix, but a later image's tokens may; the
            # cache keeps it and the continuation's mask hides it from text.)
            keep = layout.key_visible_until[0, cached_positions] >= end
            if not bool(keep.all()):
                for layer in cache.layers:  # each layer's tensors where that layer runs (device_map)
                    layer_keep = keep.to(layer.keys.device)
                    layer.keys, layer.values = layer.keys[:, :, layer_keep], layer.values[:, :, layer_keep]
                cached_positions = cached_positions[keep]
            # Between segments the cache holds exactly what the next forward may read, described here.
            cache.token_ids = input_ids[:, cached_positions]
            cache.attention_mask = torch.ones_like(cache.token_ids)
            cache.next_position = torch.tensor([end], device=device)
            start = end
        cache.num_images = layout.num_images.clone()
        cache.vision_tokens_dropped = (input_ids == self.config.image_token_id).sum(1)
        return cache

    def generate(self, inputs=None, *, past_key_values=None, keep_turn: bool = False, **kwargs):
        """transformers' generate; from a ``VoCoCache`` (``model.compress``), pass only the new text.

        The cache is copied unless ``keep_turn=True``, which extends it with this turn (question and answer)
        for a multi-turn conversation; one cache row answers a whole batch of questions.
        """
        if self.config.voco_tokens > 0 and "suppress_tokens" not in kwargs:
            # an answer never holds an image or VoCo placeholder: without their vision they would break the layout
            configured = getattr(kwargs.get("generation_config") or self.generation_config, "suppress_tokens", None)
            kwargs["suppress_tokens"] = sorted({*(configured or []), self.config.image_token_id,
                                                self.config.voco_token_id})
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
        full_attention_mask = cache.attention_mask_with(attention_mask.long())  # [batch, cache + new]
        # generate copies each question num_beams times (beam search) or num_return_sequences times (sampling),
        # its inputs but not a cache it is given: the cache's rows are copied alike
        config = kwargs.get("generation_config") or self.generation_config
        num_beams = kwargs.get("num_beams", config.num_beams) or 1
        copies = num_beams if num_beams > 1 else kwargs.get("num_return_sequences", config.num_return_sequences) or 1
        if copies > 1:
            if keep_turn:
                raise VoCoCacheError("keep_turn needs one answer per question (num_beams=1, num_return_sequences=1)")
            cache = cache.repeat_rows(torch.arange(batch_size).repeat_interleave(copies))
        output = super().generate(
            input_ids=input_ids, attention_mask=full_attention_mask, past_key_values=cache, **kwargs
        )
        if keep_turn:
            sequences = output if isinstance(output, torch.Tensor) else output.sequences
            self.keep_turn(cache, sequences, attention_mask, kwargs.get("eos_token_id"))
        return output

    @torch.no_grad()
    def keep_turn(self, cache: VoCoCache, sequences, question_mask, eos_token_id=None) -> None:
        """Make ``cache`` describe question + answer; feeds the answer's last token, which generate never
        forwards. ``sequences``: generate's output for ``cache`` (question then answer)."""
        question_length = question_mask.shape[1]
        answer = sequences[:, question_length:]
        eos = eos_token_id if eos_token_id is not None else self.generation_config.eos_token_id
        # no end-of-sequence id at all (a tokenizer without one): every generated token is the answer's
        eos_ids = [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]
        is_eos = torch.isin(answer, torch.tensor(eos_ids, dtype=torch.long, device=answer.device)).long()
        after_eos = (is_eos.cumsum(1) - is_eos) > 0  # tokens after the first EOS: padding of finished rows
        answer_mask = (~after_eos).long()
        new_ids = torch.cat([sequences[:, :question_length], answer], dim=1)
        new_mask = torch.cat([question_mask.long(), answer_mask], dim=1)
        if answer.shape[1] > 0:
            full_mask = torch.cat([cache.attention_mask, new_mask], dim=1)
            self(input_ids=answer[:, -1:], attention_mask=full_mask, past_key_values=cache, use_cache=True,
                 logits_to_keep=1)
        cache.next_position = cache.next_position + new_mask.sum(1)
        cache.token_ids = torch.cat([cache.token_ids, new_ids], dim=1)
        cache.attention_mask = torch.cat([cache.attention_mask, new_mask], dim=1)


__all__ = ["VoCoGenerationMixin"]
