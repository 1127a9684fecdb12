"""The vision-to-language projector, by LLaVA's ``--mm_projector_type`` name.

- ``mlp2x_gelu``: Llava's own ``LlavaMultiModalProjector`` (``linear_1``, GELU, ``linear_2``), so Llava
  checkpoints load unchanged. This is LLaVA-1.5's projector.
- ``linear``: one linear layer (LLaVA-1's projector), named ``linear_1`` as in Llava.
- ``llamavid``: LLaMA-VID's context + content tokens (``llama_voco.model.llamavid``), its content
  projector being Llava's.

LLaVA (the original code) stores its projector as ``model.mm_projector.{0,2}.*`` (mlp2x_gelu) or
``model.mm_projector.*`` (linear); ``llava_projector_state_dict`` maps those names to ours.
"""

from __future__ import annotations

import re

import torch
from torch import nn
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

PROJECTOR_TYPES = ("linear", "mlp2x_gelu", "llamavid")


def check_projector_type(projector_type: str) -> None:
    if projector_type not in PROJECTOR_TYPES:
        raise ValueError(f"unknown mm_projector_type {projector_type!r}; supported: {', '.join(PROJECTOR_TYPES)}")


def projector_input_size(config) -> int:
    layers = 1 if isinstance(config.vision_feature_layer, int) else len(config.vision_feature_layer)
    return config.vision_config.hidden_size * layers


class LinearProjector(nn.Module):
    """LLaVA's ``linear`` projector."""

    def __init__(self, config):
        super().__init__()
        self.linear_1 = nn.Linear(
            projector_input_size(config), config.text_config.hidden_size, bias=config.multimodal_projector_bias
        )

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.linear_1(image_features)


def build_projector(config) -> nn.Module:
    projector_type = getattr(config, "mm_projector_type", "mlp2x_gelu")
    check_projector_type(projector_type)
    if projector_type == "linear":
        return LinearProjector(config)
    if projector_type == "llamavid":
        from .llamavid import build_llamavid_projector

        return build_llamavid_projector(config)
    return LlavaMultiModalProjector(config)


# LLaVA's names -> ours, relative to the projector module.
_LLAVA_PROJECTOR_KEYS = {
    "mlp2x_gelu": {r"0\.(weight|bias)": r"linear_1.\1", r"2\.(weight|bias)": r"linear_2.\1"},
    "linear": {r"(weight|bias)": r"linear_1.\1"},
}
# Prefixes a projector key may carry: LLaVA's, Llava's in memory and on disk, or none.
_PREFIXES = ("model.mm_projector.", "mm_projector.", "model.multi_modal_projector.", "multi_modal_projector.")


def llava_projector_state_dict(state_dict: dict[str, torch.Tensor], projector_type: str, source: str = "") -> dict:
    """A projector state dict (LLaVA's ``mm_projector.bin`` names, or ours) keyed relative to our projector.

    Raises ``ValueError`` naming ``source`` when a key is not a projector key of ``projector_type``.
    """
    check_projector_type(projector_type)
    if projector_type not in _LLAVA_PROJECTOR_KEYS:
        raise ValueError(f"{source}: LLaVA projector files hold 'linear' or 'mlp2x_gelu' weights, not {projector_type!r}")
    out = {}
    for key, tensor in state_dict.items():
        prefix = next((p for p in _PREFIXES if key.startswith(p)), None)
        if prefix is None:
            raise ValueError(f"{source}: {key!r} is not a projector weight (expected a key under {' or '.join(_PREFIXES)})")
        rest = key[len(prefix):]
        if "mm_projector" in prefix:
            for pattern, replacement in _LLAVA_PROJECTOR_KEYS[projector_type].items():
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


__all__ = ["PROJECTOR_TYPES", "LinearProjector", "build_projector", "check_projector_type", "llava_projector_state_dict"]
