"""``LlavaProcessor`` that follows each image's tokens with ``voco_tokens`` ``<voco>`` tokens."""

from __future__ import annotations

import re
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import LlavaProcessor

from ..constants import IMAGE_PLACEHOLDER, TEXT_DECODER_TOKENIZER_DIR, VIDEO_PLACEHOLDER, VOCO_TOKEN
from ..conversation import turn_around
from ..video import is_frame_features, read_frame_features
from .configuration_voco_llava import VoCoLlavaConfig
from .image_inputs import image_token_spec, tokens_per_image
from .projectors import get_projector, projector_for
from .projectors.llamavid import encode_instructions


@dataclass(frozen=True)
class _CallImages:
    """What one call knows about its images, in token order, for the replacements the parent makes."""

    is_frame: tuple[bool, ...]
    is_precomputed: tuple[bool, ...] | None  # None when no image is a precomputed frame
    voco_tokens: int | None = None  # this call's k (an elastic model's), None: the processor's


# The images of the call in progress. LlavaProcessor asks ``replace_image_token`` for each image's tokens
# with no room for per-image facts (its typed kwargs refuse unknown keys), so they travel in a context
# variable: per thread and per call, never on the instance, so one processor serves concurrent calls.
_CALL_IMAGES: ContextVar[_CallImages | None] = ContextVar("llava_voco_call_images", default=None)


class VoCoLlavaProcessor(LlavaProcessor):
    """Expands ``<image>`` exactly as ``LlavaProcessor`` does, then appends the VoCo tokens.

    With ``voco_tokens=0`` the output is the parent's, token for token. ``mm_projector_type`` names the
    model's projector method (``projectors``), which says how many tokens an image becomes; its settings
    (``vision_token_pooling``, LLaMA-VID's compress types and instruction length) default to the config's.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        patch_size=None,
        vision_feature_select_strategy=None,
        chat_template=None,
        image_token=IMAGE_PLACEHOLDER,
        num_additional_image_tokens=0,
        voco_tokens: int = 0,
        voco_token_choices: list[int] | None = None,
        voco_token: str = VOCO_TOKEN,
        llamavid_compress_type: str | None = None,
        llamavid_video_compress_type: str | None = None,
        instruction_max_length: int | None = None,
        llamavid_grid_pooling: str | None = None,
        vision_token_pooling: str = VoCoLlavaConfig.vision_token_pooling,
        mm_projector_type: str | None = None,
        voco_separator: str = "",
        conversation_version: str | None = None,
        **kwargs,
    ):
        if voco_tokens < 0:
            raise ValueError(f"voco_tokens must be >= 0, got {voco_tokens}")
        self.voco_tokens = voco_tokens
        # an elastic model's VoCo counts (VoCoLlavaConfig.voco_train_tokens): __call__(voco_tokens=k) picks one
        self.voco_token_choices = sorted(voco_token_choices) if voco_token_choices else None
        self.voco_token = voco_token
        # text between an image's tokens and its VoCo tokens: "" (right after them), or the conversation
        # template's (ConversationTemplate.voco_separator: "\n" for voco_official, the released VoCo-LLaMA
        # layout "<image>\n<voco><voco>\n", which voco_mask_mode="official" reads)
        self.voco_separator = voco_separator
        # The projector method. A LLaMA-VID compress type given to a method that reads none (a processor saved
        # before the method was recorded, or one asked for LLaMA-VID that way) means LLaMA-VID.
        mm_projector_type = mm_projector_type or VoCoLlavaConfig.mm_projector_type
        if llamavid_compress_type is not None and not get_projector(mm_projector_type).reads_instruction:
            mm_projector_type = "llamavid"
        self.mm_projector_type = mm_projector_type
        # LLaMA-VID (None with another method): each image becomes 1 context + pooled content tokens
        reads_instruction = projector_for(self).reads_instruction
        self.llamavid_compress_type = (llamavid_compress_type or VoCoLlavaConfig.llamavid_compress_type
                                       if reads_instruction else None)
        self.llamavid_video_compress_type = (llamavid_video_compress_type or VoCoLlavaConfig.llamavid_video_compress_type
                                             if reads_instruction else None)
        self.instruction_max_length = instruction_max_length or VoCoLlavaConfig.llamavid_instruction_max_length
        self.llamavid_grid_pooling = (llamavid_grid_pooling or VoCoLlavaConfig.llamavid_grid_pooling
                                      if reads_instruction else None)
        # Average pooling before a linear / mlp2x_gelu projector (VoCoLlavaConfig.vision_token_pooling)
        self.vision_token_pooling = vision_token_pooling
        # the --version template the model was trained with (the train entry records it with its chat template)
        self.conversation_version = conversation_version
        # LLaMA-VID's text decoder tokenizer (BERT WordPiece); saved in a subfolder, see save_pretrained
        self.text_decoder_tokenizer = None
        self.voco_token_id = None
        if voco_tokens > 0:
            voco_ids = tokenizer.encode(voco_token, add_special_tokens=False)
            if len(voco_ids) != 1 or voco_ids[0] == tokenizer.unk_token_id:
                raise ValueError(
                    f"voco_tokens={voco_tokens} but the tokenizer has no single token for {voco_token!r} "
                    f"(it encodes to {voco_ids}); add it with llava_voco.add_voco_to_llava or "
                    "tokenizer.add_tokens(..., special_tokens=True)"
                )
            self.voco_token_id = voco_ids[0]
        super().__init__(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=patch_size,
            vision_feature_select_strategy=vision_feature_select_strategy,
            chat_template=chat_template,
            image_token=image_token,
            num_additional_image_tokens=num_additional_image_tokens,
            **kwargs,
        )

    video_token = VIDEO_PLACEHOLDER

    @property
    def reads_instruction(self) -> bool:
        """Whether each image's instruction is tokenized for the model (LLaMA-VID's text decoder reads it)."""
        return projector_for(self).reads_instruction

    @classmethod
    def from_llava_processor(cls, processor: LlavaProcessor, voco_tokens: int, tokenizer=None) -> "VoCoLlavaProcessor":
        """The same image processor, tokenizer (or ``tokenizer``), template and image-token settings, with VoCo."""
        rebuilt = cls(
            image_processor=processor.image_processor,
            tokenizer=tokenizer if tokenizer is not None else processor.tokenizer,
            patch_size=processor.patch_size,
            vision_feature_select_strategy=processor.vision_feature_select_strategy,
            chat_template=processor.chat_template,
            image_token=processor.image_token,
            num_additional_image_tokens=processor.num_additional_image_tokens,
            voco_tokens=voco_tokens,
            voco_token_choices=getattr(processor, "voco_token_choices", None),
            llamavid_compress_type=getattr(processor, "llamavid_compress_type", None),
            llamavid_video_compress_type=getattr(processor, "llamavid_video_compress_type", None),
            instruction_max_length=getattr(processor, "instruction_max_length", None),
            llamavid_grid_pooling=getattr(processor, "llamavid_grid_pooling", None),
            vision_token_pooling=getattr(processor, "vision_token_pooling", VoCoLlavaConfig.vision_token_pooling),
            mm_projector_type=getattr(processor, "mm_projector_type", None),
            voco_separator=getattr(processor, "voco_separator", ""),
            conversation_version=getattr(processor, "conversation_version", None),
        )
        rebuilt.text_decoder_tokenizer = getattr(processor, "text_decoder_tokenizer", None)
        return rebuilt

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """Also writes LLaMA-VID's text decoder tokenizer, in ``TEXT_DECODER_TOKENIZER_DIR``."""
        result = super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
        if self.text_decoder_tokenizer is not None:
            self.text_decoder_tokenizer.save_pretrained(Path(save_directory) / TEXT_DECODER_TOKENIZER_DIR)
        return result

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        processor = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        folder = Path(pretrained_model_name_or_path) / TEXT_DECODER_TOKENIZER_DIR
        if folder.is_dir():
            from transformers import AutoTokenizer

            processor.text_decoder_tokenizer = AutoTokenizer.from_pretrained(folder)
        return processor

    def __call__(self, images=None, text=None, videos=None, instructions=None, **kwargs):
        """As ``LlavaProcessor``, plus ``videos``: each a list of frames (PIL images), one per ``<video>``
        in the text, in order. A video is its frames as consecutive images, so each frame gets its own
        image tokens and ``voco_tokens`` VoCo tokens (VoCo video, docs/design.md §2.2). With videos (or LLaMA-VID)
        the output has ``video_frame_mask``: which images are video frames.

        A video may also be precomputed frame features: a tensor ``[frames, patches, dim]`` (the model's
        ``vision_patch_features``) or a ``.safetensors`` file of ``scripts/extract_video_features.py``. Its
        frames get the tokens pixel frames get; they are output as ``frame_features`` ``[frames, patches,
        dim]`` (all such videos, in order), ``frame_features_mask`` ``[images]`` (which images they are) and
        are absent from ``pixel_values``.

        LLaMA-VID: ``instructions``, one per ``<image>`` / ``<video>`` placeholder in order (a video's
        goes to each of its frames), become ``instruction_input_ids`` / ``instruction_attention_mask``
        through ``text_decoder_tokenizer``; without them each image gets the turn of its sample's text that
        shows it (``conversation.turn_around``: the human turn, as training gives it), placeholders removed
        (left-truncated, so the question at the end is kept).

        ``voco_tokens=k``: this call's VoCo count, one of an elastic model's (``voco_token_choices``)."""
        voco_tokens = kwargs.pop("voco_tokens", None)
        if voco_tokens is not None:
            choices = self.voco_token_choices or [self.voco_tokens]
            if voco_tokens not in choices:
                raise ValueError(f"voco_tokens={voco_tokens}: this processor's model was trained with VoCo counts {choices}")
        reads_instruction = self.reads_instruction
        if videos is None and not reads_instruction:
            call_images = _CALL_IMAGES.set(_CallImages((), None, voco_tokens))
            try:
                return super().__call__(images=images, text=text, **kwargs)
            finally:
                _CALL_IMAGES.reset(call_images)
        texts = [text] if isinstance(text, str) else list(text)
        images = [] if images is None else list(images) if isinstance(images, (list, tuple)) else [images]
        videos = [] if videos is None else list(videos)
        placeholder = re.compile(f"({re.escape(self.image_token)}|{re.escape(self.video_token)})")
        pending_images, pending_videos = iter(images), iter(videos)
        pending_instructions = iter(instructions) if instructions is not None else None
        ordered_images, frame_flags, expanded, image_instructions = [], [], [], []
        frame_features, precomputed_flags = [], []  # precomputed videos; per image, whether it is one of their frames
        placeholders_per_sample = []  # (span in the caller's text, images it stands for)
        for sample in texts:
            pieces, placeholders, cursor = [], [], 0
            for piece in placeholder.split(sample):
                span = (cursor, cursor + len(piece))
                cursor += len(piece)
                if piece in (self.image_token, self.video_token):
                    if pending_instructions is not None:
                        instruction = next(pending_instructions, None)
                    else:
                        instruction = placeholder.sub("", turn_around(sample, *span)).strip()
                    if instruction is None:
                        raise ValueError("fewer instructions than <image>/<video> placeholders: LLaMA-VID needs one each")
                if piece == self.image_token:
                    image = next(pending_images, None)
                    if image is None:
                        raise ValueError(f"more {self.image_token} placeholders in the text than images given")
                    ordered_images.append(image)
                    frame_flags.append(False)
                    precomputed_flags.append(False)
                    image_instructions.append(instruction)
                    pieces.append(piece)
                    placeholders.append((span, piece, 1))
                elif piece == self.video_token:
                    frames = next(pending_videos, None)
                    if is_frame_features(frames):
                        frames = read_frame_features(frames)
                    if frames is None or len(frames) == 0:
                        raise ValueError(f"a {self.video_token} in the text has no video (or an empty one) to go with it")
                    if isinstance(frames, torch.Tensor):
                        frame_features.append(self.check_frame_features(frames))
                    else:
                        ordered_images.extend(frames)
                    precomputed_flags.extend([isinstance(frames, torch.Tensor)] * len(frames))
                    frame_flags.extend([True] * len(frames))
                    image_instructions.extend([instruction] * len(frames))
                    pieces.append(self.image_token * len(frames))
                    placeholders.append((span, piece, len(frames)))
                else:
                    pieces.append(piece)
            expanded.append("".join(pieces))
            placeholders_per_sample.append(placeholders)
        leftover_images, leftover_videos = sum(1 for _ in pending_images), sum(1 for _ in pending_videos)
        if leftover_images or leftover_videos:
            raise ValueError(
                f"{leftover_images} image(s) and {leftover_videos} video(s) given beyond the placeholders in the text"
            )
        call_images = _CALL_IMAGES.set(
            _CallImages(tuple(frame_flags), tuple(precomputed_flags) if frame_features else None, voco_tokens)
        )
        try:
            output = super().__call__(
                images=ordered_images or ([] if frame_features else None),
                text=expanded if not isinstance(text, str) else expanded[0],
                **kwargs,
            )
        finally:
            _CALL_IMAGES.reset(call_images)
        if "text_replacement_offsets" in output:
            # Offsets against the caller's text: a <video> is one replacement covering its frames.
            output["text_replacement_offsets"] = [
                self._merge_replacements(offsets, placeholders)
                for offsets, placeholders in zip(output["text_replacement_offsets"], placeholders_per_sample)
            ]
        if frame_flags:
            as_tensors = kwargs.get("return_tensors") == "pt"
            output["video_frame_mask"] = torch.tensor(frame_flags) if as_tensors else frame_flags
            if frame_features:
                output["frame_features"] = torch.cat(frame_features)  # [precomputed frames, patches, dim]
                output["frame_features_mask"] = torch.tensor(precomputed_flags) if as_tensors else precomputed_flags
            if reads_instruction and self.text_decoder_tokenizer is not None:
                encoded = encode_instructions(self.text_decoder_tokenizer, image_instructions, self.instruction_max_length)
                output.update(encoded if as_tensors else {k: v.tolist() for k, v in encoded.items()})
        return output

    def _frame_size(self) -> tuple[int, int]:
        """(height, width) of a frame after the image processor: the size frame features were extracted at."""
        size = getattr(self.image_processor, "crop_size", None) or self.image_processor.size
        return size["height"], size["width"]

    def check_frame_features(self, features: torch.Tensor) -> torch.Tensor:
        """Precomputed frames must have the patches of one of this processor's frames, so that they get the
        same tokens as pixels (the model checks their width against its vision tower)."""
        if features.ndim != 3:
            raise ValueError(f"frame features must be [frames, patches, dim], got shape {tuple(features.shape)}")
        height, width = self._frame_size()
        patches = image_token_spec(self).patches
        if features.shape[1] != patches:
            raise ValueError(
                f"frame features have {features.shape[1]} patches per frame, but this processor's {height}x{width} "
                f"frames give {patches} (extracted with another vision tower or image size?)"
            )
        return features

    def validate_inputs(self, images=None, text=None, videos=None, audio=None, **kwargs):
        call = _CALL_IMAGES.get()
        if call is not None and call.is_precomputed is not None:
            return  # __call__ matched every placeholder to an image or a frame; precomputed frames have no pixels
        return super().validate_inputs(images=images, text=text, videos=videos, audio=audio, **kwargs)

    def _process_images(self, images, **kwargs):
        """Precomputed frames have no pixels: only the other images go through the image processor, and each
        frame gets the tokens of a pixel frame, by ``replace_image_token`` on a stand-in of a frame's size
        (a broadcast zero: no memory)."""
        call = _CALL_IMAGES.get()
        if call is None or call.is_precomputed is None:
            return super()._process_images(images, **kwargs)
        processed = self.image_processor(images, **kwargs) if images else {}
        stand_in = np.broadcast_to(np.zeros((), dtype=np.float32), (3, *self._frame_size()))
        with_pixels = iter(range(len(images)))
        sized = [stand_in if precomputed else processed["pixel_values"][next(with_pixels)]
                 for precomputed in call.is_precomputed]
        image_inputs = {**processed, "pixel_values": sized}
        replacements = [self.replace_image_token(image_inputs, image_idx=index, **kwargs)
                        for index in range(len(sized))]
        return processed, replacements

    @staticmethod
    def _merge_replacements(offsets: list[dict], placeholders: list) -> list[dict]:
        merged, taken = [], iter(offsets)
        for span, text, images in placeholders:
            parts = [next(taken) for _ in range(images)]
            replacement = "".join(part["replacement"] for part in parts)
            merged.append({
                "type": "video" if images != 1 or text != parts[0]["text"] else "image",
                "span": span,
                "new_span": (parts[0]["new_span"][0], parts[-1]["new_span"][1]),
                "text": text,
                "replacement": replacement,
            })
        return merged

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        """The image's tokens (``image_inputs.tokens_per_image``: patches, pooled or LLaMA-VID tokens),
        then ``voco_separator`` and its VoCo tokens."""
        call = _CALL_IMAGES.get()
        is_frame = bool(call is not None and image_idx < len(call.is_frame) and call.is_frame[image_idx])
        pixels = image_inputs["pixel_values"][image_idx]
        count = tokens_per_image(self, is_frame, image_size=tuple(pixels.shape[-2:]))
        voco = call.voco_tokens if call is not None and call.voco_tokens is not None else count.voco
        voco_run = (self.voco_separator + self.voco_token * voco) if voco else ""
        return self.image_token * count.image + voco_run


__all__ = ["VoCoLlavaProcessor", "VOCO_TOKEN"]
