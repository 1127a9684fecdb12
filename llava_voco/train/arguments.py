"""The training entry's flags, all three groups: LLaVA's names, types and meanings (``ModelArguments``,
``DataArguments``, ``TrainingArguments``), parsed by ``parse_args``, and what follows from them alone (the
training dtype, the vision tower's attention backend). Flags LLaVA accepts that would have no effect here are
refused by ``llava_voco.train.checks``, never silently ignored.

Defaults that LLaVA sets to values we cannot honour (or that depend on the checkpoint) are None here and
resolved by the plan (``llava_voco.train.plan``) and the build (``llava_voco.train.building``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import transformers
from transformers import HfArgumentParser

from llava_voco.model.configuration_voco_llava import VoCoLlavaConfig
from llava_voco.model.attention import attention_backend


# LLaVA's --mm_projector_type default: the projector of a model built from an LLM and a vision tower.
NEW_MODEL_PROJECTOR = "linear"
# LLaVA's --mm_vision_select_feature -> transformers' vision_feature_select_strategy.
SELECT_FEATURE = {"patch": "default", "cls_patch": "full"}
# --image_aspect_ratio: LLaVA's values that need no LLaVA-NeXT model.
ASPECT_RATIOS = ("pad", "square")


class TrainConfigError(ValueError):
    """A command line that cannot train as asked; the message says which flag and why."""


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "An LLM directory (with --vision_tower), or a full Llava / VoCo-Llava checkpoint."},
    )
    version: str = field(default="v1", metadata={"help": "Conversation template (LLaVA's --version names)."})
    freeze_backbone: bool = field(default=False, metadata={"help": "Freeze the LLM body (not lm_head, not the projector)."})
    tune_mm_mlp_adapter: bool = field(default=False, metadata={"help": "Pretrain stage: only the projector trains."})
    vision_tower: str | None = field(default=None, metadata={"help": "A CLIP vision (or full CLIP) directory."})
    mm_vision_select_layer: int | None = field(
        default=None, metadata={"help": "Vision layer whose features are projected (LLaVA default -1; -2 in LLaVA-1.5)."}
    )
    pretrain_mm_mlp_adapter: str | None = field(
        default=None, metadata={"help": "Projector weights: LLaVA's mm_projector.bin or our mm_projector.safetensors."}
    )
    mm_projector_type: str | None = field(
        default=None,
        metadata={"help": "linear (LLaVA's default), mlp2x_gelu, llamavid, or a method registered with "
                  "llava_voco.model.projectors.register_projector."},
    )
    mm_use_im_start_end: bool = field(default=False, metadata={"help": "Refused when True (see the message)."})
    mm_use_im_patch_token: bool = field(default=False, metadata={"help": "Refused when True (see the message)."})
    mm_patch_merge_type: str = field(default="flat", metadata={"help": "Only 'flat' (LLaVA-1.5)."})
    mm_vision_select_feature: str | None = field(
        default=None, metadata={"help": "patch (drop CLS, LLaVA default) or cls_patch."}
    )
    image_grid_pinpoints: str | None = field(default=None, metadata={"help": "LLaVA-NeXT anyres: refused."})
    unfreeze_mm_vision_tower: bool = field(default=False, metadata={"help": "Train the vision tower too."})
    # ours
    voco_tokens: int | None = field(
        default=None,
        metadata={"help": "VoCo tokens after each image (0 = plain LLaVA). Default: the checkpoint's (0 for LLaVA)."},
    )
    voco_mask_mode: str | None = field(default=None, metadata={"help": "paper (default) or official."})
    voco_mask_in_training: bool = field(
        default=True,
        metadata={"help": "False trains the VoCo paper's lower bound: VoCo tokens in the sequence but no VoCo mask "
                  "(text sees the vision tokens); the saved model still compresses (and is evaluated) with the mask."},
    )
    voco_train_tokens: str | None = field(
        default=None,
        metadata={"help": "Elastic k (docs/design.md §2.7): comma-separated VoCo counts, e.g. 1,2,4,8 with --voco_tokens 8; "
                  "each sample trains with one drawn from them, and the saved model compresses with any of them. "
                  "Default: the checkpoint's set (one count: --voco_tokens)."},
    )
    # distillation against the uncompressed model (docs/design.md §2.4, §2.7; llava_voco.train.distillation)
    voco_distill_weight: float = field(
        default=0.0,
        metadata={"help": "Adds w * KL(teacher || student) over the answer tokens; the teacher sees every vision "
                  "token (the same weights with the VoCo mask off, under no_grad, unless --voco_teacher)."},
    )
    voco_distill_temperature: float = field(default=1.0, metadata={"help": "Temperature of the distillation KL."})
    voco_distill_hidden: float = field(
        default=0.0,
        metadata={"help": "Adds w2 * the mean squared difference of student and teacher hidden states at the text "
                  "positions, per layer (the paper's attention distillation, explicit)."},
    )
    voco_teacher: str | None = field(
        default=None,
        metadata={"help": "A checkpoint directory to distil from (frozen), instead of the same weights with the mask off."},
    )
    attn_implementation: str = field(
        default="sdpa",
        metadata={"help": "The language model's attention backend (docs/design.md §2.5; the table in "
                  "llava_voco.model.attention): sdpa, eager, flex_attention, varlen_reference (the flash-attn varlen "
                  "plan in pure torch), varlen_torch (torch's CUDA varlen kernel), flash_attention_2 (needs pip "
                  "install 'llava-voco[gpu]'), or one registered there."},
    )
    # LLaMA-VID (--mm_projector_type llamavid, set-up (a))
    text_decoder_tokenizer: str | None = field(
        default=None, metadata={"help": "LLaMA-VID: the text decoder's BERT WordPiece tokenizer directory."}
    )
    text_decoder_config: str | None = field(
        default=None,
        metadata={"help": "LLaMA-VID: a JSON file of InstructBlipQFormerConfig fields (default: BERT-base sized)."},
    )
    text_decoder_path: str | None = field(
        default=None,
        metadata={"help": "LLaMA-VID: an InstructBLIP checkpoint whose Q-Former and queries start the text decoder."},
    )
    # LLaMA-VID's defaults are the config's (VoCoLlavaConfig), never written here
    num_query: int = field(
        default=VoCoLlavaConfig.llamavid_num_query, metadata={"help": "LLaMA-VID: learnable queries of the text decoder."}
    )
    compress_type: str = field(
        default=VoCoLlavaConfig.llamavid_compress_type,
        metadata={"help": "LLaMA-VID content tokens of an image: none, mean or grid:g."},
    )
    video_compress_type: str = field(
        default=VoCoLlavaConfig.llamavid_video_compress_type, metadata={"help": "LLaMA-VID content tokens of a video frame."}
    )
    instruction_max_length: int = field(
        default=VoCoLlavaConfig.llamavid_instruction_max_length,
        metadata={"help": "LLaMA-VID: instruction tokens kept (from the end)."},
    )
    freeze_text_decoder: bool = field(default=False, metadata={
        "help": "LLaMA-VID: keep the text decoder (Q-Former), its input LayerNorm and queries frozen (LLaMA-VID's "
        "bert_type ..._freeze: stage 1, with --tune_mm_mlp_adapter)."})
    freeze_context_token: bool = field(default=False, metadata={
        "help": "LLaMA-VID: keep every module of the context token frozen (text decoder, input LayerNorm, queries, "
        "query/key/context projections); the content projector trains (LLaMA-VID's ..._freeze_all: stage 3)."})
    text_decoder_input_norm: bool = field(default=VoCoLlavaConfig.llamavid_text_decoder_input_norm, metadata={
        "help": "LLaMA-VID: a LayerNorm on the features the text decoder reads (LLaMA-VID's vlm_att_ln; "
        "--text_decoder_path loads it from InstructBLIP's vision post_layernorm)."})
    grid_pooling: str = field(default=VoCoLlavaConfig.llamavid_grid_pooling, metadata={
        "help": "LLaMA-VID: how grid:g pools: avg_pool (LLaMA-VID's, kernel side // g) or adaptive (exactly g x g)."})
    frame_chunk: int = field(
        default=VoCoLlavaConfig.frame_chunk, metadata={"help": "Images or frames through the vision tower at once."}
    )
    vision_token_pooling: str = field(
        default=VoCoLlavaConfig.vision_token_pooling,
        metadata={"help": "Average-pool each image's patches before a linear/mlp2x_gelu projector: none, mean "
                  "(1 token per image, the VoCo paper's pooling baseline) or grid:g."},
    )


@dataclass
class DataArguments:
    """LLaVA's data flags, same names and defaults, plus ``--skip_bad_samples``."""

    data_path: str = field(default=None, metadata={"help": "Training data: a JSON list or JSONL file, LLaVA format."})
    lazy_preprocess: bool = field(
        default=False,
        metadata={
            "help": "Accepted as LLaVA's scripts pass it: here every sample is decoded and tokenized when drawn "
            "either way (LLaVA's True); what is checked before training is --check_samples."
        },
    )
    is_multimodal: bool = field(
        default=False,
        metadata={
            "help": "As in LLaVA, whose train.py sets it itself when the model has a vision tower (the train "
            "entry should too): move a turn's single <image> to its start, followed by a newline. Otherwise "
            "placeholders stay where the data puts them."
        },
    )
    image_folder: str | None = field(default=None, metadata={"help": "Folder the samples' image paths are relative to."})
    image_aspect_ratio: str = field(
        default="square",
        metadata={"help": "'pad': pad to a square with the image processor's mean colour; 'square': as the processor does."},
    )
    check_samples: bool = field(
        default=True,
        metadata={
            "help": "Before the first step, check every sample's structure and that each image or video opens "
            "(file headers only, in a thread pool); bad samples are refused together in one line, or skipped "
            "with --skip_bad_samples. False: each sample is checked only when drawn (a bad one then stops the "
            "run there, or is skipped there with --skip_bad_samples)."
        },
    )
    image_per_turn: bool = field(
        default=False,
        metadata={
            "help": "LLaMA-VID's imgsp_v1 (its --version for stages 2 and 3): a sample's image is shown again in every "
            "later human turn, each copy read by the text decoder with its own turn. Samples with one image only."
        },
    )
    keep_instruction_newlines: bool = field(
        default=False,
        metadata={
            "help": "LLaMA-VID: keep the newlines in the instruction each image's text decoder reads. By default they "
            "are deleted (without a space), as LLaMA-VID's training does (its inference passes the question as is)."
        },
    )
    skip_bad_samples: bool = field(
        default=False,
        metadata={"help": "Log, count and skip malformed samples and unreadable images instead of stopping."},
    )
    cache_samples: bool = field(
        default=False,
        metadata={
            "help": "Keep each built sample (ids, labels, pixel values) in memory after its first use, so later "
            "epochs skip decoding and tokenizing. For small data sets trained for several epochs: memory grows "
            "with the data set, and each dataloader worker keeps its own cache (use persistent workers)."
        },
    )
    video_folder: str | None = field(
        default=None, metadata={"help": "Folder the samples' video paths are relative to (default: --image_folder)."}
    )
    video_fps: float = field(default=1.0, metadata={"help": "Frames taken per second of video."})
    max_frames: int | None = field(
        default=None, metadata={"help": "At most this many frames per video, sampled uniformly over it."}
    )
    packing: bool = field(
        default=False,
        metadata={
            "help": "Padding-free packing (docs/design.md §2.6): each batch's samples are laid one after another "
            "in rows of at most --model_max_length tokens (never split), position ids restarting at each sample, "
            "so no padding is computed between them; losses and gradients equal the padded batch's."
        },
    )

    def __post_init__(self):
        if self.video_fps <= 0:
            raise ValueError(f"--video_fps must be positive, got {self.video_fps}")
        if self.image_aspect_ratio not in ASPECT_RATIOS:
            raise ValueError(
                f"--image_aspect_ratio {self.image_aspect_ratio!r} is not supported here (LLaVA-NeXT's 'anyres' "
                f"tiling needs a LLaVA-NeXT model); use one of {ASPECT_RATIOS}"
            )


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    cache_dir: str | None = field(default=None)
    optim: str = field(default="adamw_torch")
    remove_unused_columns: bool = field(default=False)
    freeze_mm_mlp_adapter: bool = field(default=False)
    mpt_attn_impl: str | None = field(default=None, metadata={"help": "MPT models: refused."})
    model_max_length: int = field(default=512, metadata={"help": "Maximum sequence length (tokens)."})
    double_quant: bool | None = field(default=None, metadata={"help": "Only with --bits 4/8: refused."})
    quant_type: str | None = field(default=None, metadata={"help": "Only with --bits 4/8: refused."})
    bits: int = field(default=16, metadata={"help": "16 only: 4/8-bit (QLoRA) needs bitsandbytes on CUDA."})
    lora_enable: bool = False
    lora_r: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_weight_path: str = field(default="", metadata={"help": "Declared but never read by LLaVA: refused."})
    lora_bias: str = "none"
    lora_merge_on_save: bool = field(
        default=True,
        metadata={"help": "Merge LoRA into the weights on save (the output loads with from_pretrained); "
                  "False saves the PEFT adapter instead."},
    )
    mm_projector_lr: float | None = None
    mm_vision_tower_lr: float | None = None
    group_by_modality_length: bool = field(default=False)
    # Names LLaVA's scripts pass that transformers 5 folded into others.
    evaluation_strategy: str | None = field(default=None, metadata={"help": "Alias of --eval_strategy."})
    warmup_ratio: float | None = field(default=None, metadata={"help": "Alias of --warmup_steps given as a ratio in [0, 1)."})

    def __post_init__(self):
        if self.evaluation_strategy is not None:
            self.eval_strategy = self.evaluation_strategy
        if self.warmup_ratio is not None:
            if not 0 <= self.warmup_ratio < 1:
                raise TrainConfigError(f"--warmup_ratio {self.warmup_ratio}: must be in [0, 1)")
            if self.warmup_steps:
                raise TrainConfigError("--warmup_ratio and --warmup_steps: pass one of them")
            self.warmup_steps = self.warmup_ratio
        super().__post_init__()


def build_parser() -> HfArgumentParser:
    return HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))


def parse_args(argv: list[str] | None = None):
    """(ModelArguments, DataArguments, TrainingArguments) from ``argv`` (default: the command line). A value
    the argument classes reject (``--fp16`` with ``--bf16``, an unknown ``--image_aspect_ratio``, ...) is a
    ``TrainConfigError``."""
    try:
        return build_parser().parse_args_into_dataclasses(args=argv)
    except TrainConfigError:
        raise
    except ValueError as error:
        raise TrainConfigError(one_line(str(error))) from error


def one_line(message: str) -> str:
    return " ".join(message.split())


def training_dtype(training_args) -> torch.dtype:
    """The dtype the model is loaded and trained in: bf16 under ``--bf16``, fp16 under ``--fp16`` with DeepSpeed
    (its fp16 mode keeps fp32 master weights), fp32 otherwise. ``--fp16`` without DeepSpeed keeps fp32 weights
    under torch's fp16 autocast: torch AMP's gradient scaler refuses fp16 gradients."""
    if training_args.bf16:
        return torch.bfloat16
    if training_args.fp16 and training_args.deepspeed:
        return torch.float16
    return torch.float32


def vision_attn_implementation(attn_implementation: str) -> str:
    """The vision tower's backend for the LLM's ``attn_implementation`` (the table's; a varlen kernel is a causal
    language-model kernel, so the bidirectional vision tower runs sdpa beside it)."""
    return attention_backend(attn_implementation).vision_implementation


__all__ = [
    "ASPECT_RATIOS",
    "DataArguments",
    "SELECT_FEATURE",
    "ModelArguments",
    "NEW_MODEL_PROJECTOR",
    "TrainConfigError",
    "TrainingArguments",
    "build_parser",
    "parse_args",
    "training_dtype",
    "vision_attn_implementation",
]
