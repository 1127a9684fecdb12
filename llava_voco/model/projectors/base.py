"""What a way of turning an image into tokens provides, and the one registry every caller asks.

A projector *method* (``ImageProjector``) says what it builds (the module stored as the model's
``multi_modal_projector``), how many tokens an image or a video frame becomes, and how it encodes a chunk of
images' patch features; the config's ``mm_projector_type`` names it. The config, the processor, the data
pipeline, the collator, the Trainer, the train entry and the inference path all ask the registry
(``projector_for``), so a new method is one module plus one ``register_projector(name, cls)`` call, which
may come from outside the package.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:  # image_inputs imports this package: type hints only
    from ..image_inputs import ImageInputs, ImageTokenSpec


def projector_input_size(config) -> int:
    """Width of the patch features a projector reads: the vision width times the selected layers."""
    layers = 1 if isinstance(config.vision_feature_layer, int) else len(config.vision_feature_layer)
    return config.vision_config.hidden_size * layers


class ImageProjector:
    """One way an image becomes the LLM's tokens. Subclass it and ``register_projector(name, cls)``.

    ``build``, ``image_tokens`` and ``encode`` are required; the rest have defaults that fit a projector with
    no settings of its own."""

    name: str = ""  # the mm_projector_type it is registered under (set by register_projector)
    # each image's instruction is read (LLaMA-VID's text decoder): the processor tokenizes it with its
    # ``text_decoder_tokenizer``, the data pipeline gives each image the human turn that shows it
    reads_instruction: bool = False
    # ``vision_token_pooling`` (average pooling before the projector) applies to it; if not, why
    accepts_pooling: bool = False
    pooling_refusal: str = "this projector method takes no pooling before it"
    # train-entry flags (``ModelArguments`` fields) only this method reads: refused with another one
    train_flags: tuple[str, ...] = ()
    # LLaVA's ``mm_projector.bin`` key patterns -> ours (``llava_projector_state_dict``); None: no such file
    llava_keys: dict[str, str] | None = None

    # ---- the model ----------------------------------------------------------------------------------
    def check_config(self, config) -> None:
        """Raise ``ValueError`` when ``config`` (a ``VoCoLlavaConfig``) cannot be built with this method."""

    def build(self, config) -> nn.Module:
        """The module stored as ``multi_modal_projector``."""
        raise NotImplementedError

    def image_tokens(self, spec: "ImageTokenSpec", is_frame: bool) -> int:
        """Tokens one image (``is_frame``: one video frame) becomes, VoCo tokens aside."""
        raise NotImplementedError

    def encode(self, model, patches: torch.Tensor, images: "ImageInputs", grid: tuple[int, int] | None
               ) -> Sequence[torch.Tensor]:
        """Each image's tokens ``[image_tokens, D]`` from its patch features ``patches`` (``[images, N, C]``, one
        chunk of at most ``config.frame_chunk`` images, in token order). ``model``: the ``VoCoLlavaModel``
        (``multi_modal_projector``, ``config``); ``grid``: the patch grid's (rows, columns), None when the
        patches are not a grid (a CLS token kept)."""
        raise NotImplementedError

    def writes_llava_checkpoint(self, config) -> bool:
        """Whether a model with VoCo off is saved as a plain ``llava`` checkpoint (stock Llava builds the same
        projector and tokens)."""
        return False

    # ---- the processor ------------------------------------------------------------------------------
    def processor_fields(self, config) -> dict:
        """``VoCoLlavaProcessor`` arguments (besides ``mm_projector_type``) the token count depends on."""
        return {}

    # ---- the train entry ----------------------------------------------------------------------------
    def config_fields_from_flags(self, model_args, vision_config) -> dict:
        """``VoCoLlavaConfig`` fields from the train flags, for a model built from an LLM and a vision tower;
        checked from configs and tokenizers only (no weight read). Raises ``ValueError`` naming the flag."""
        return {}

    def init_from_flags(self, module: nn.Module, model_args) -> None:
        """Load what the flags name into a freshly built projector (a pretrained part). Raises ``ValueError``."""

    def freeze_from_flags(self, module: nn.Module, model_args) -> None:
        """Freeze the parts the flags keep frozen."""

    def prepare_processor(self, processor, model_args) -> None:
        """Give a freshly built processor what the flags name (a tokenizer of its own)."""


_PROJECTORS: dict[str, ImageProjector] = {}


def register_projector(name: str, projector_class: type[ImageProjector], *, replace: bool = False) -> None:
    """Make ``mm_projector_type=name`` build and encode with ``projector_class`` (instantiated with no
    arguments). A name already taken is refused unless ``replace``."""
    if name in _PROJECTORS and not replace:
        raise ValueError(f"mm_projector_type {name!r} is registered already ({type(_PROJECTORS[name]).__name__})")
    method = projector_class()
    method.name = name
    _PROJECTORS[name] = method


def projector_names() -> tuple[str, ...]:
    return tuple(_PROJECTORS)


def get_projector(name: str) -> ImageProjector:
    """The method registered as ``name``; an unknown name is a ``ValueError`` listing the known ones."""
    try:
        return _PROJECTORS[name]
    except KeyError:
        raise ValueError(f"unknown mm_projector_type {name!r}; supported: {', '.join(_PROJECTORS)}") from None


def projector_for(source) -> ImageProjector:
    """The method of a model config, a processor (``VoCoLlavaProcessor.mm_projector_type``) or an
    ``ImageTokenSpec``; a plain ``LlavaConfig`` / ``LlavaProcessor`` is Llava's ``mlp2x_gelu``."""
    name = getattr(source, "mm_projector_type", None) or getattr(source, "projector_type", None) or "mlp2x_gelu"
    return get_projector(name)


__all__ = [
    "ImageProjector",
    "get_projector",
    "projector_for",
    "projector_input_size",
    "projector_names",
    "register_projector",
]
