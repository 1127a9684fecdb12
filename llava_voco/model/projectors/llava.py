"""LLaVA's projectors, by ``--mm_projector_type``: every patch (or, with ``vision_token_pooling``, the pooled
patches, ``pooled.py``) through a small network.

- ``mlp2x_gelu``: Llava's own ``LlavaMultiModalProjector`` (``linear_1``, GELU, ``linear_2``), so Llava
  checkpoints load unchanged. This is LLaVA-1.5's projector.
- ``linear``: one linear layer (LLaVA-1's projector), named ``linear_1`` as in Llava.

LLaVA (the original code) stores its projector as ``model.mm_projector.{0,2}.*`` (mlp2x_gelu) or
``model.mm_projector.*`` (linear); ``llava_projector_state_dict`` maps those names to ours.
"""

from __future__ import annotations

import re

import torch
from torch import nn
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from .base import ImageProjector, get_projector, projector_input_size
from .pooled import content_tokens_per_frame, pool_patches


class LinearProjector(nn.Module):
    """LLaVA's ``linear`` projector."""

    def __init__(self, config):
        super().__init__()
        self.linear_1 = nn.Linear(
            projector_input_size(config), config.text_config.hidden_size, bias=config.multimodal_projector_bias
        )

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.linear_1(image_features)


class PatchProjector(ImageProjector):
    """Every patch feature (or each pooled one) becomes one token through the projector."""

    accepts_pooling = True

    def image_tokens(self, spec, is_frame: bool) -> int:
        if spec.vision_token_pooling == "none":
            return spec.patches
        return content_tokens_per_frame(spec.vision_token_pooling, spec.patches)

    def encode(self, model, patches, images, grid):
        pooling = model.config.vision_token_pooling
        if pooling != "none":
            patches = pool_patches(patches, pooling, grid)  # [images, n, C]
        return list(model.multi_modal_projector(patches))

    def processor_fields(self, config) -> dict:
        return {"vision_token_pooling": config.vision_token_pooling}


class MlpGeluProjector(PatchProjector):
    """``mlp2x_gelu``: Llava's own projector."""

    llava_keys = {r"0\.(weight|bias)": r"linear_1.\1", r"2\.(weight|bias)": r"linear_2.\1"}

    def build(self, config) -> nn.Module:
        return LlavaMultiModalProjector(config)

    def writes_llava_checkpoint(self, config) -> bool:
        return config.vision_token_pooling == "none"  # stock Llava would read every patch


class LinearPatchProjector(PatchProjector):
    """``linear``: LLaVA-1's projector (stock Llava has none: such checkpoints stay ``voco_llava``)."""

    llava_keys = {r"(weight|bias)": r"linear_1.\1"}

    def build(self, config) -> nn.Module:
        return LinearProjector(config)


# Prefixes a projector key may carry: LLaVA's, Llava's in memory and on disk, or none.
_PREFIXES = ("model.mm_projector.", "mm_projector.", "model.multi_modal_projector.", "multi_modal_projector.")


def llava_projector_state_dict(state_dict: dict[str, torch.Tensor], projector_type: str, source: str = "") -> dict:
    """A projector state dict (LLaVA's ``mm_projector.bin`` names, or ours) keyed relative to our projector.

    Our names (``multi_modal_projector.``, what our pretrain stage writes) are any projector's, LLaMA-VID's
    included; LLaVA's (``mm_projector.``) are renamed, and only a linear or MLP projector has them. Raises
    ``ValueError`` naming ``source`` when a key is not a projector key of ``projector_type``.
    """
    llava_keys = get_projector(projector_type).llava_keys
    out = {}
    for key, tensor in state_dict.items():
        prefix = next((p for p in _PREFIXES if key.startswith(p)), None)
        if prefix is None:
            raise ValueError(f"{source}: {key!r} is not a projector weight (expected a key under {' or '.join(_PREFIXES)})")
        rest = key[len(prefix):]
        if "mm_projector" in prefix:
            if llava_keys is None:
                raise ValueError(f"{source}: LLaVA projector files hold 'linear' or 'mlp2x_gelu' weights, not "
                                 f"{projector_type!r} (this package's pretrain stage writes any projector's)")
            for pattern, replacement in llava_keys.items():
                if re.fullmatch(pattern, rest):
                    rest = re.sub(pattern, replacement, rest)
                    break
            else:
                raise ValueError(
                    f"{source}: {key!r} is not a weight of LLaVA's {projector_type!r} projector "
                    f"(was it saved with another --mm_projector_type?)"
                )
        out[rest] = tensor
    return out


__all__ = ["LinearPatchProjector", "LinearProjector", "MlpGeluProjector", "PatchProjector", "llava_projector_state_dict"]
