"""``LlavaProcessor`` that follows each image's tokens with ``voco_tokens`` ``<voco>`` tokens."""

from __future__ import annotations

import re

from transformers import LlavaProcessor

VOCO_TOKEN = "<voco>"


class VoCoLlavaProcessor(LlavaProcessor):
    """Expands ``<image>`` exactly as ``LlavaProcessor`` does, then appends the VoCo tokens.

    With ``voco_tokens=0`` the output is the parent's, token for token.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        patch_size=None,
        vision_feature_select_strategy=None,
        chat_template=None,
        image_token="<image>",
        num_additional_image_tokens=0,
        voco_tokens: int = 0,
        voco_token: str = VOCO_TOKEN,
        llamavid_compress_type: str | None = None,
        llamavid_video_compress_type: str | None = None,
        **kwargs,
    ):
        if voco_tokens < 0:
            raise ValueError(f"voco_tokens must be >= 0, got {voco_tokens}")
        self.voco_tokens = voco_tokens
        self.voco_token = voco_token
        # LLaMA-VID (None: plain LLaVA tokens): each image becomes 1 context + pooled content tokens
        self.llamavid_compress_type = llamavid_compress_type
        self.llamavid_video_compress_type = llamavid_video_compress_type or llamavid_compress_type
        self._frame_flags: list[bool] | None = None
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

    video_token = "<video>"

    def __call__(self, images=None, text=None, videos=None, **kwargs):
        """As ``LlavaProcessor``, plus ``videos``: each a list of frames (PIL images), one per ``<video>``
        in the text, in order. A video is its frames as consecutive images, so each frame gets its own
        image tokens and ``voco_tokens`` VoCo tokens (VoCo video, DESIGN 2.2). With videos (or LLaMA-VID)
        the output has ``video_frame_mask``: which images are video frames."""
        if videos is None and self.llamavid_compress_type is None:
            return super().__call__(images=images, text=text, **kwargs)
        texts = [text] if isinstance(text, str) else list(text)
        images = [] if images is None else list(images) if isinstance(images, (list, tuple)) else [images]
        videos = [] if videos is None else list(videos)
        placeholder = re.compile(f"({re.escape(self.image_token)}|{re.escape(self.video_token)})")
        pending_images, pending_videos = iter(images), iter(videos)
        ordered_images, frame_flags, expanded = [], [], []
        for sample in texts:
            pieces = []
            for piece in placeholder.split(sample):
                if piece == self.image_token:
                    image = next(pending_images, None)
                    if image is None:
                        raise ValueError(f"more {self.image_token} placeholders in the text than images given")
                    ordered_images.append(image)
                    frame_flags.append(False)
                    pieces.append(piece)
                elif piece == self.video_token:
                    frames = next(pending_videos, None)
                    if not frames:
                        raise ValueError(f"a {self.video_token} in the text has no video (or an empty one) to go with it")
                    ordered_images.extend(frames)
                    frame_flags.extend([True] * len(frames))
                    pieces.append(self.image_token * len(frames))
                else:
                    pieces.append(piece)
            expanded.append("".join(pieces))
        leftover_images, leftover_videos = sum(1 for _ in pending_images), sum(1 for _ in pending_videos)
        if leftover_images or leftover_videos:
            raise ValueError(
                f"{leftover_images} image(s) and {leftover_videos} video(s) given beyond the placeholders in the text"
            )
        self._frame_flags = frame_flags
        try:
            output = super().__call__(
                images=ordered_images or None, text=expanded if not isinstance(text, str) else expanded[0], **kwargs
            )
        finally:
            self._frame_flags = None
        if ordered_images:
            import torch

            output["video_frame_mask"] = torch.tensor(frame_flags) if kwargs.get("return_tensors") == "pt" else frame_flags
        return output

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        image_tokens = super().replace_image_token(image_inputs, image_idx, **kwargs)
        if self.llamavid_compress_type is not None:
            from .llamavid import content_tokens_per_frame

            is_frame = bool(self._frame_flags and self._frame_flags[image_idx])
            spec = self.llamavid_video_compress_type if is_frame else self.llamavid_compress_type
            image_tokens = self.image_token * (1 + content_tokens_per_frame(spec, len(image_tokens) // len(self.image_token)))
        return image_tokens + self.voco_token * self.voco_tokens


__all__ = ["VoCoLlavaProcessor", "VOCO_TOKEN"]
