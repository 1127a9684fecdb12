"""What an image becomes: its features and its token count, in one place.

- :class:`ImageInputs`, built once per forward, records in token order which images are pixels, which are
  precomputed frame features (``scripts/extract_video_features.py``), which are video frames, and each
  image's instruction (LLaMA-VID).
- :func:`encode_images` is the one function that turns them into the LLM's tokens: each image's patch
  features, from the vision tower or, for precomputed features, as given (they skip the tower and get the
  tokens their pixels would), through the projector method the config names (``projectors``: ``linear`` /
  ``mlp2x_gelu``, pooled or not, LLaMA-VID's context + content tokens, or one registered from outside).
- :func:`tokens_per_image` is the one count of tokens an image or frame takes in the LLM's sequence, for a
  model config or a processor (asked of the same projector method): the processor, the data pipeline's
  lengths, the ZeRO-3 blank-image row, the train entry and the chat path all call it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .configuration_voco_llava import VoCoLlavaConfig
from .projectors import projector_for, projector_input_size


@dataclass(frozen=True)
class ImageTokenSpec:
    """Everything the token count of one image depends on, read from a model config or a processor."""

    patch_rows: int  # patch grid of the vision tower's input (image height // patch size)
    patch_columns: int
    extra_tokens: int  # tokens beside the patches that reach the LLM (CLS under the "full" strategy)
    projector_type: str = VoCoLlavaConfig.mm_projector_type  # a registered projector method (projectors)
    vision_token_pooling: str = VoCoLlavaConfig.vision_token_pooling  # linear / mlp2x_gelu
    compress_type: str = VoCoLlavaConfig.llamavid_compress_type  # LLaMA-VID, images
    video_compress_type: str = VoCoLlavaConfig.llamavid_video_compress_type  # LLaMA-VID, video frames
    grid_pooling: str = VoCoLlavaConfig.llamavid_grid_pooling  # LLaMA-VID, how grid:g pools
    voco_tokens: int = 0

    @property
    def patches(self) -> int:
        """Patch features per image (what LLaMA-VID and pooling read; CLS dropped under "default")."""
        return self.patch_rows * self.patch_columns + self.extra_tokens

    @property
    def grid(self) -> tuple[int, int] | None:
        """The patches' (rows, columns); None when a CLS token is kept beside them (not a grid)."""
        return (self.patch_rows, self.patch_columns) if self.extra_tokens == 0 else None

    @classmethod
    def from_config(cls, config) -> "ImageTokenSpec":
        """From a ``VoCoLlavaConfig`` (or a plain ``LlavaConfig``: no pooling, no VoCo)."""
        vision = config.vision_config
        height, width = _pair(vision.image_size)
        patch_height, patch_width = _pair(vision.patch_size)
        return cls(
            patch_rows=height // patch_height,
            patch_columns=width // patch_width,
            extra_tokens=1 if config.vision_feature_select_strategy == "full" else 0,
            projector_type=projector_for(config).name,
            vision_token_pooling=getattr(config, "vision_token_pooling", cls.vision_token_pooling),
            compress_type=getattr(config, "llamavid_compress_type", cls.compress_type),
            video_compress_type=getattr(config, "llamavid_video_compress_type", cls.video_compress_type),
            grid_pooling=getattr(config, "llamavid_grid_pooling", cls.grid_pooling),
            voco_tokens=getattr(config, "voco_tokens", 0),
        )

    @classmethod
    def from_processor(cls, processor) -> "ImageTokenSpec":
        """From a ``VoCoLlavaProcessor`` (or a ``LlavaProcessor``): the image processor's output size, the
        patch size and the CLS token exactly as ``LlavaProcessor.replace_image_token`` counts them."""
        image_processor = processor.image_processor
        size = getattr(image_processor, "crop_size", None) or image_processor.size
        patch = processor.patch_size
        extra = processor.num_additional_image_tokens - (1 if processor.vision_feature_select_strategy == "default" else 0)
        return cls(
            patch_rows=size["height"] // patch,
            patch_columns=size["width"] // patch,
            extra_tokens=max(extra, 0),
            projector_type=projector_for(processor).name,
            vision_token_pooling=getattr(processor, "vision_token_pooling", None) or cls.vision_token_pooling,
            compress_type=getattr(processor, "llamavid_compress_type", None) or cls.compress_type,
            video_compress_type=getattr(processor, "llamavid_video_compress_type", None) or cls.video_compress_type,
            grid_pooling=getattr(processor, "llamavid_grid_pooling", None) or cls.grid_pooling,
            voco_tokens=getattr(processor, "voco_tokens", 0),
        )


@dataclass(frozen=True)
class ImageTokenCount:
    """Tokens one image or frame takes in the LLM's sequence."""

    image: int  # placeholder tokens its features replace
    voco: int  # VoCo tokens after them (0 with VoCo off)

    @property
    def total(self) -> int:
        return self.image + self.voco


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def image_token_spec(source) -> ImageTokenSpec:
    """An :class:`ImageTokenSpec` from a spec, a model config or a processor."""
    if isinstance(source, ImageTokenSpec):
        return source
    if hasattr(source, "vision_config"):
        return ImageTokenSpec.from_config(source)
    if hasattr(source, "image_processor"):
        return ImageTokenSpec.from_processor(source)
    raise TypeError(f"tokens_per_image needs a model config or a processor, got {type(source).__name__}")


def tokens_per_image(source, is_frame: bool = False, image_size: tuple[int, int] | None = None) -> ImageTokenCount:
    """Tokens one image (``is_frame``: one video frame) becomes, for a model config or a processor.

    The image tokens are the projector method's count (``projectors``; linear / mlp2x_gelu: one per patch,
    plus CLS under "full", or the pooled count; LLaMA-VID: 1 context token plus the pooled content tokens,
    frames pooled with the video compress type); then ``voco_tokens`` VoCo tokens. ``image_size``: the (height, width) the
    image reaches the vision tower at, when a processor was asked for another size than its own.
    """
    spec = image_token_spec(source)
    if image_size is not None:
        patch = source.patch_size if hasattr(source, "patch_size") and isinstance(source.patch_size, int) else None
        if patch is None:
            patch = _pair(source.vision_config.patch_size)[0]
        spec = replace(spec, patch_rows=int(image_size[0]) // patch, patch_columns=int(image_size[1]) // patch)
    return ImageTokenCount(image=projector_for(spec).image_tokens(spec, is_frame), voco=spec.voco_tokens)


# ---------------------------------------------------------------------------------------------------
# The images of one forward, in token order.
# ---------------------------------------------------------------------------------------------------
@dataclass
class ImageInputs:
    """The images of one forward (or one chunk of them), in the order of their tokens.

    ``pixel_values`` hold the images that have pixels, in order; ``frame_features`` the precomputed frames,
    in order; ``is_precomputed`` says which image is which. Per-image rows (``is_frame`` and LLaMA-VID's
    instruction tokens) follow all images.
    """

    pixel_values: torch.Tensor | None  # [images with pixels, 3, H, W]
    frame_features: torch.Tensor | None  # [precomputed frames, N, C]
    is_precomputed: torch.Tensor  # [images] bool
    is_frame: torch.Tensor  # [images] bool: a video's frame (LLaMA-VID pools those with its video compress type)
    instruction_input_ids: torch.Tensor | None = None  # [images, L] text decoder tokens of each image's instruction
    instruction_attention_mask: torch.Tensor | None = None  # [images, L]

    @classmethod
    def from_forward(
        cls,
        pixel_values: torch.Tensor | None = None,
        frame_features: torch.Tensor | None = None,
        frame_features_mask: torch.Tensor | None = None,
        video_frame_mask: torch.Tensor | None = None,
        instruction_input_ids: torch.Tensor | None = None,
        instruction_attention_mask: torch.Tensor | None = None,
    ) -> "ImageInputs | None":
        """From the model's forward inputs; None when there is no image. ``frame_features_mask`` may be
        left out when every image is a precomputed frame."""
        if pixel_values is None and frame_features is None:
            return None
        with_pixels = len(pixel_values) if pixel_values is not None else 0
        device = (pixel_values if pixel_values is not None else frame_features).device
        if frame_features is None:
            is_precomputed = torch.zeros(with_pixels, dtype=torch.bool, device=device)
        elif frame_features_mask is None:
            if pixel_values is not None:
                raise ValueError(
                    "pixel_values and frame_features together need frame_features_mask: which images (in token "
                    "order) are the precomputed frames"
                )
            is_precomputed = torch.ones(len(frame_features), dtype=torch.bool, device=device)
        else:
            is_precomputed = frame_features_mask.bool().to(device)
            if int(is_precomputed.sum()) != len(frame_features) or int((~is_precomputed).sum()) != with_pixels:
                raise ValueError(
                    f"frame_features_mask marks {int(is_precomputed.sum())} precomputed frame(s) and "
                    f"{int((~is_precomputed).sum())} image(s) with pixels, but {len(frame_features)} frame_features "
                    f"and {with_pixels} pixel_values were given"
                )
        num_images = len(is_precomputed)
        is_frame = (video_frame_mask.bool().to(device) if video_frame_mask is not None
                    else torch.zeros(num_images, dtype=torch.bool, device=device))
        if len(is_frame) != num_images:
            raise ValueError(f"video_frame_mask has {len(is_frame)} entries for {num_images} image(s)")
        if instruction_input_ids is not None and len(instruction_input_ids) != num_images:
            raise ValueError(
                f"{num_images} image(s) but {len(instruction_input_ids)} instruction(s): LLaMA-VID needs one "
                "instruction per image or frame"
            )
        return cls(pixel_values, frame_features, is_precomputed, is_frame, instruction_input_ids,
                   instruction_attention_mask)

    def __len__(self) -> int:
        return len(self.is_precomputed)

    def select(self, images: slice) -> "ImageInputs":
        """The images numbered ``images`` (a contiguous range in token order): a prompt's images in a batch,
        or a chunk of a long video."""
        start, stop, _ = images.indices(len(self))
        frames_before = int(self.is_precomputed[:start].sum()), int(self.is_precomputed[:stop].sum())
        pixels_before = start - frames_before[0], stop - frames_before[1]

        def rows(tensor, begin, end):
            return tensor[begin:end] if tensor is not None and end > begin else None

        return replace(
            self,
            pixel_values=rows(self.pixel_values, *pixels_before),
            frame_features=rows(self.frame_features, *frames_before),
            is_precomputed=self.is_precomputed[start:stop],
            is_frame=self.is_frame[start:stop],
            instruction_input_ids=rows(self.instruction_input_ids, start, stop),
            instruction_attention_mask=rows(self.instruction_attention_mask, start, stop),
        )

    def token_counts(self, config) -> list[int]:
        """Image tokens of each image (VoCo tokens not included), by :func:`tokens_per_image`."""
        counts = {is_frame: tokens_per_image(config, is_frame).image for is_frame in (False, True)}
        return [counts[is_frame] for is_frame in self.is_frame.tolist()]


# ---------------------------------------------------------------------------------------------------
# Features: patch features (from pixels or precomputed), then the projector method.
# ---------------------------------------------------------------------------------------------------
def vision_patch_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """``[images, N, C]``: the selected vision layer(s)' patch features of a ``VoCoLlavaModel`` (CLS dropped
    under the "default" strategy; several layers concatenated, as Llava does), ``frame_chunk`` images
    through the tower at a time. This is what precomputed frame features store."""
    config = model.config
    layers = config.vision_feature_layer
    chunks = []
    for start in range(0, pixel_values.shape[0], config.frame_chunk):
        hidden = model.vision_tower(pixel_values[start : start + config.frame_chunk], output_hidden_states=True)
        selected = [hidden.hidden_states[layer] for layer in ([layers] if isinstance(layers, int) else layers)]
        if config.vision_feature_select_strategy == "default":
            selected = [states[:, 1:] for states in selected]
        chunks.append(torch.cat(selected, dim=-1))
    return torch.cat(chunks)


def checked_frame_features(model, frame_features: torch.Tensor) -> torch.Tensor:
    """Precomputed frames on the vision tower's device and dtype; another width or rank is refused (they
    must be what :func:`vision_patch_features` gives)."""
    width = projector_input_size(model.config)
    if frame_features.ndim != 3 or frame_features.shape[-1] != width:
        raise ValueError(
            f"frame_features must be [frames, patches, {width}] (this model's vision tower's patch features), "
            f"got {tuple(frame_features.shape)} (extracted with another vision tower?)"
        )
    tower = next(model.vision_tower.parameters())
    return frame_features.to(tower.device, tower.dtype)


def patch_features(model, images: ImageInputs) -> torch.Tensor:
    """``[images, N, C]``: every image's patch features, from the vision tower or, for precomputed frames, as
    given (they skip the tower)."""
    if images.frame_features is None:
        return vision_patch_features(model, images.pixel_values)
    frame_features = checked_frame_features(model, images.frame_features)
    if images.pixel_values is None:
        return frame_features
    from_pixels = vision_patch_features(model, images.pixel_values)  # [images with pixels, N, C]
    if from_pixels.shape[1] != frame_features.shape[1]:
        raise ValueError(
            f"frame_features have {frame_features.shape[1]} patches per frame, the images' pixels give "
            f"{from_pixels.shape[1]} (extracted at another image size?)"
        )
    features = from_pixels.new_empty(len(images), *from_pixels.shape[1:])
    precomputed = images.is_precomputed.to(features.device)
    features[~precomputed] = from_pixels
    features[precomputed] = frame_features
    return features


def encode_images(model, images: ImageInputs) -> list[torch.Tensor]:
    """Each image's tokens for the LLM, ``[tokens_per_image(config, is_frame).image, D]``, in token order.

    ``model`` is a ``VoCoLlavaModel`` (its vision tower, projector and config). Images go through the tower
    and the projector method ``frame_chunk`` at a time, so a long video keeps memory flat."""
    config = model.config
    method = projector_for(config)
    grid = ImageTokenSpec.from_config(config).grid
    features: list[torch.Tensor] = []
    for start in range(0, len(images), config.frame_chunk):
        chunk = images.select(slice(start, start + config.frame_chunk))
        patches = patch_features(model, chunk)  # [chunk, N, C]
        features.extend(method.encode(model, patches, chunk, grid))
    return features


__all__ = [
    "ImageInputs",
    "checked_frame_features",
    "encode_images",
    "patch_features",
    "vision_patch_features",
    "ImageTokenCount",
    "ImageTokenSpec",
    "image_token_spec",
    "tokens_per_image",
]
