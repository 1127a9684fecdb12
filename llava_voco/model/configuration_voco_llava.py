"""Configuration of a LLaVA model that compresses each image into ``voco_tokens`` VoCo tokens."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import LlavaConfig

from .projectors import get_projector, parse_compress_type
from .voco_mask import check_mask_mode

# What an image becomes: the projector method and its settings (a checkpoint's own, kept when it trains on)
PROJECTOR_FIELDS = (
    "mm_projector_type", "llamavid_num_query", "llamavid_qformer", "llamavid_compress_type",
    "llamavid_video_compress_type", "llamavid_instruction_max_length", "llamavid_text_decoder_input_norm",
    "llamavid_grid_pooling", "frame_chunk", "vision_token_pooling",
)
VOCO_FIELDS = ("voco_tokens", "voco_token_id", "voco_mask_mode", "voco_train_tokens", *PROJECTOR_FIELDS)


@strict
class VoCoLlavaConfig(LlavaConfig):
    r"""``LlavaConfig`` plus VoCo (docs/design.md §2).

    voco_tokens (`int`, defaults to 0):
        VoCo tokens after each image. 0 switches VoCo off: the model is then plain LLaVA, and
        ``save_pretrained`` writes a plain ``llava`` config that stock transformers loads.
    voco_train_tokens (`list[int]`, *optional*):
        An elastic model's VoCo counts (docs/design.md §2.7): trained with one drawn per sample, it compresses
        with any of them (``voco_tokens`` is the largest). None: only ``voco_tokens``.
    voco_token_id (`int`, *optional*):
        Id of the ``<voco>`` token in the tokenizer; required when ``voco_tokens > 0``.
    voco_mask_mode (`str`, defaults to ``"paper"``):
        ``"paper"`` (text may see the system prompt) or ``"official"`` (text sees nothing before the
        first VoCo token, as the released VoCo-LLaMA code does).
    mm_projector_type (`str`, defaults to ``"mlp2x_gelu"``):
        The projector method, by LLaVA's names: ``"mlp2x_gelu"`` (Llava's own projector), ``"linear"``,
        ``"llamavid"``, or one registered with ``llava_voco.model.projectors.register_projector``.
    llamavid_num_query, llamavid_qformer, llamavid_compress_type, llamavid_video_compress_type,
    llamavid_instruction_max_length, llamavid_text_decoder_input_norm, llamavid_grid_pooling:
        LLaMA-VID (``mm_projector_type="llamavid"``, docs/design.md §3): learnable queries of the text decoder, its
        ``InstructBlipQFormerConfig`` fields, the content pooling of images and of video frames
        (``none`` | ``mean`` | ``grid:g``), the instruction tokens its text decoder reads (kept from the end;
        256, the released code's), the LayerNorm on the features the text decoder reads (LLaMA-VID's
        ``vlm_att_ln``, on in every released model), and how ``grid:g`` pools (``"avg_pool"``, the released
        code's kernel ``side // g``, or ``"adaptive"``, exactly ``g x g``). The LayerNorm and pooling defaults
        are the released code's (a LLaMA-VID checkpoint saved before they existed loads with
        ``llamavid_text_decoder_input_norm=False, llamavid_grid_pooling="adaptive"``).
        These are LLaMA-VID's defaults everywhere: the train flags and the processor take theirs from here.
    frame_chunk (`int`, defaults to 64):
        Images or frames through the vision tower and the projector at once.
    vision_token_pooling (`str`, defaults to ``"none"``):
        Average pooling of each image's patch features before a ``linear`` / ``mlp2x_gelu`` projector:
        ``"none"``, ``"mean"`` (1 token per image: the VoCo paper's pooling baseline) or ``"grid:g"``.
    """

    model_type = "voco_llava"

    voco_tokens: int = 0
    voco_train_tokens: list[int] | None = None
    voco_token_id: int | None = None
    voco_mask_mode: str = "paper"
    mm_projector_type: str = "mlp2x_gelu"
    llamavid_num_query: int = 32
    llamavid_qformer: dict | None = None
    llamavid_compress_type: str = "grid:2"
    llamavid_video_compress_type: str = "mean"
    llamavid_instruction_max_length: int = 256
    llamavid_text_decoder_input_norm: bool = True
    llamavid_grid_pooling: str = "avg_pool"
    frame_chunk: int = 64
    vision_token_pooling: str = "none"

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        check_mask_mode(self.voco_mask_mode)
        projector = get_projector(self.mm_projector_type)
        if self.vision_token_pooling != "none":
            parse_compress_type(self.vision_token_pooling)
        projector.check_config(self)
        if self.vision_token_pooling != "none" and not projector.accepts_pooling:
            raise ValueError(f"vision_token_pooling={self.vision_token_pooling!r} with mm_projector_type="
                             f"{self.mm_projector_type!r}: {projector.pooling_refusal}")
        if self.frame_chunk < 1:
            raise ValueError(f"frame_chunk must be >= 1, got {self.frame_chunk}")
        if self.voco_tokens < 0:
            raise ValueError(f"voco_tokens must be >= 0, got {self.voco_tokens}")
        if self.voco_train_tokens is not None:
            counts = sorted(set(int(k) for k in self.voco_train_tokens))
            if not counts or counts[0] < 1 or counts[-1] != self.voco_tokens:
                raise ValueError(
                    f"voco_train_tokens {self.voco_train_tokens}: VoCo counts >= 1 whose largest is voco_tokens="
                    f"{self.voco_tokens}"
                )
            self.voco_train_tokens = counts
        if self.voco_tokens > 0 and self.voco_token_id is None:
            raise ValueError("voco_tokens > 0 needs voco_token_id (the id of <voco> in the tokenizer)")
        if self.voco_token_id is not None and self.voco_token_id == self.image_token_id:
            raise ValueError(f"voco_token_id and image_token_id are both {self.voco_token_id}")

    @property
    def voco_token_counts(self) -> list[int]:
        """The VoCo counts this model compresses with: an elastic model's set, else ``[voco_tokens]``."""
        return list(self.voco_train_tokens) if self.voco_train_tokens else [self.voco_tokens]

    def check_voco_tokens(self, voco_tokens: int) -> int:
        """``voco_tokens`` if this model was trained for it, else a ValueError naming the counts it was."""
        if voco_tokens not in self.voco_token_counts:
            raise ValueError(
                f"voco_tokens={voco_tokens}: this model was trained with VoCo counts {self.voco_token_counts}"
            )
        return voco_tokens

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """With VoCo off the checkpoint is written as plain LLaVA (docs/design.md §4), unless its projector is one
        Llava does not have (``linear``, pooling): stock Llava would then load it with a wrong projector."""
        if self.voco_tokens == 0 and get_projector(self.mm_projector_type).writes_llava_checkpoint(self):
            return self.to_llava_config().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
        return super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)

    def to_llava_config(self) -> LlavaConfig:
        values = self.to_dict()
        for key in (*VOCO_FIELDS, "model_type", "transformers_version", "architectures"):
            values.pop(key, None)
        config = LlavaConfig(**values)
        config.architectures = ["LlavaForConditionalGeneration"]
        return config
