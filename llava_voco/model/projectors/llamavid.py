"""LLaMA-VID's projector (docs/design.md §3): each image or frame becomes one text-guided context token plus
pooled content tokens.

For frame ``t`` with patch features ``X_t`` (``[N, C]``) and, when the tower keeps it
(``vision_feature_select_strategy="full"``, as LLaMA-VID's EVA-ViT-G does), a CLS token before them:

* the text decoder, transformers' ``InstructBlipQFormerModel`` (BERT layers with cross-attention to
  ``LN([CLS;] X_t)``: the CLS token too when there is one, and ``LN`` the text decoder's input LayerNorm,
  LLaMA-VID's ``vlm_att_ln``, when ``llamavid_text_decoder_input_norm``), reads the user's instruction and
  ``M`` learnable queries; its ``M`` query outputs are projected to text queries ``Q_t`` (``[M, C]``);
* context attention: ``E_t = mean_M(softmax(Q_t K_t^T / sqrt(C)) X_t)`` with ``K_t`` a linear map of
  ``X_t`` (never CLS); a linear map of ``E_t`` to the LLM width is the **context token**;
* content tokens: ``X_t`` (never CLS) pooled (``grid:g`` -> average pooling over the patch grid, LLaMA-VID's
  ``avg_pool`` or ``adaptive``, see ``pooled.py``; ``mean`` -> 1 token, ``none`` -> all N) and passed
  through the usual LLaVA projector.

These are LLaMA-VID's (dvlab-research/LLaMA-VID at b3d3ae2, ``vlm_attention`` / ``token_generation``), checked
against a fixture made by its code (tests/test_parity_llamavid.py).

Frames go through in chunks of ``frame_chunk`` (the config's) so that memory does not grow with the video's
length. ``LlamaVidMethod`` is its entry in the projector registry (``mm_projector_type="llamavid"``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer, InstructBlipQFormerConfig, InstructBlipQFormerModel
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from ...frame_features import FrameFeatures  # noqa: F401  (the projector reads such files a chunk at a time)
from .base import ImageProjector
from .pooled import check_grid_pooling, content_tokens_per_frame, parse_compress_type, pool_patches

# LLaMA-VID's vlm_att_ln is torch's LayerNorm at its default eps (as LAVIS's ln_vision it starts from)
INPUT_NORM_EPS = 1e-5


class LlamaVidProjector(nn.Module):
    """Context token (text decoder + context attention) and content tokens for each frame."""

    def __init__(
        self,
        qformer_config: InstructBlipQFormerConfig,
        vision_hidden_size: int,
        text_hidden_size: int,
        content_projector: nn.Module,
        num_query: int,
        frame_chunk: int | None = None,
        input_norm: bool = False,
        grid_pooling: str = "adaptive",
    ):
        """``input_norm``: a LayerNorm on the features the text decoder reads (LLaMA-VID's ``vlm_att_ln``);
        ``grid_pooling``: how ``grid:g`` pools (``pooled.GRID_POOLINGS``). The config's defaults for both are
        LLaMA-VID's (``build_llamavid_projector``)."""
        super().__init__()
        if qformer_config.encoder_hidden_size != vision_hidden_size:
            raise ValueError(
                f"the text decoder cross-attends to vision features of width {vision_hidden_size}, "
                f"but its encoder_hidden_size is {qformer_config.encoder_hidden_size}"
            )
        self.text_decoder = InstructBlipQFormerModel(qformer_config)
        self.query_tokens = nn.Parameter(torch.randn(1, num_query, qformer_config.hidden_size) * 0.02)
        self.query_projection = nn.Linear(qformer_config.hidden_size, vision_hidden_size)
        self.key_projection = nn.Linear(vision_hidden_size, vision_hidden_size)
        self.context_projection = nn.Linear(vision_hidden_size, text_hidden_size)
        self.content_projector = content_projector
        self.text_decoder_input_norm = nn.LayerNorm(vision_hidden_size, eps=INPUT_NORM_EPS) if input_norm else None
        self.grid_pooling = check_grid_pooling(grid_pooling)
        self.frame_chunk = frame_chunk  # frames per pass when forward is given none (config.frame_chunk; None: all)

    def text_queries(self, decoder_features, instruction_ids, instruction_mask) -> torch.Tensor:
        """``Q_t``: ``[frames, M, C]``, the query outputs of the text decoder reading the instruction and
        cross-attending to ``decoder_features`` (``[frames, N or 1 + N, C]``, through the input LayerNorm)."""
        frames = decoder_features.shape[0]
        if self.text_decoder_input_norm is not None:
            decoder_features = self.text_decoder_input_norm(decoder_features)
        query_embeds = self.query_tokens.expand(frames, -1, -1)
        decoded = self.text_decoder(
            input_ids=instruction_ids,
            attention_mask=torch.cat(
                [instruction_mask.new_ones(frames, query_embeds.shape[1]), instruction_mask], dim=1
            ),
            query_embeds=query_embeds,
            encoder_hidden_states=decoder_features,
        ).last_hidden_state
        return self.query_projection(decoded[:, : query_embeds.shape[1]])

    def context_token(self, patch_features, instruction_ids, instruction_mask, decoder_features=None) -> torch.Tensor:
        """``[frames, 1, D]``: ``context_projection(mean_M(softmax(Q K^T / sqrt(C)) X))``, ``X`` the patches;
        the text decoder reads ``decoder_features`` (CLS + patches; default the patches)."""
        decoder_features = patch_features if decoder_features is None else decoder_features
        queries = self.text_queries(decoder_features, instruction_ids, instruction_mask)  # [F, M, C]
        keys = self.key_projection(patch_features)  # [F, N, C]
        scores = queries @ keys.transpose(1, 2) / math.sqrt(patch_features.shape[-1])  # [F, M, N]
        attended = scores.softmax(dim=-1) @ patch_features  # [F, M, C]
        return self.context_projection(attended.mean(dim=1, keepdim=True))

    def forward(
        self,
        patch_features: torch.Tensor,  # [frames, N, C]
        instruction_ids: torch.LongTensor,  # [frames, L] text decoder tokens of each frame's instruction
        instruction_mask: torch.Tensor,  # [frames, L]
        compress_type: str,
        frame_chunk: int | None = None,
        grid: tuple[int, int] | None = None,
        cls_token: bool = False,
        grid_pooling: str | None = None,
    ) -> torch.Tensor:
        """``[frames, 1 + n, D]``: each frame's ``[context, content...]`` tokens, computed ``frame_chunk`` (default:
        the config's) frames at a time. ``cls_token``: the features start with the tower's CLS token
        (``[frames, 1 + N, C]``), which only the text decoder reads; ``grid``: the patches' rows and columns;
        ``grid_pooling``: how ``grid:g`` pools (default: the one it was built with).

        ``patch_features`` may also be a :class:`FrameFeatures` file: then only one chunk of features is
        in memory at a time, and the output (written in place, no concatenation) is the only thing that
        grows with the number of frames."""
        parse_compress_type(compress_type)
        grid_pooling = check_grid_pooling(grid_pooling or self.grid_pooling)
        width = patch_features.shape[-1]
        if width != self.key_projection.in_features:
            where = getattr(patch_features, "path", "the frame features")
            raise ValueError(
                f"{where}: features of width {width}, but this model's vision tower gives "
                f"{self.key_projection.in_features} (extracted with another vision tower?)"
            )
        total = len(patch_features)
        frame_chunk = frame_chunk or self.frame_chunk or max(total, 1)
        tokens = None
        for start in range(0, total, frame_chunk):
            features = patch_features[start : start + frame_chunk]
            chunk_ids = instruction_ids[start : start + frame_chunk]
            chunk_mask = instruction_mask[start : start + frame_chunk]
            patches = features[:, 1:] if cls_token else features  # [F, N, C]
            context = self.context_token(patches, chunk_ids, chunk_mask, decoder_features=features)
            content = self.content_projector(pool_patches(patches, compress_type, grid, grid_pooling))
            if tokens is None:
                tokens = context.new_empty(total, 1 + content.shape[1], context.shape[-1])
            tokens[start : start + len(features), :1] = context
            tokens[start : start + len(features), 1:] = content
        return tokens


def build_llamavid_projector(config) -> LlamaVidProjector:
    """The projector a ``VoCoLlavaConfig`` with ``mm_projector_type="llamavid"`` describes."""
    vision_hidden = config.vision_config.hidden_size
    if not isinstance(config.vision_feature_layer, int):
        raise ValueError("LLaMA-VID reads one vision feature layer; vision_feature_layer must be an int")
    qformer_config = InstructBlipQFormerConfig(**{**(config.llamavid_qformer or {}), "encoder_hidden_size": vision_hidden})
    return LlamaVidProjector(
        qformer_config, vision_hidden, config.text_config.hidden_size, LlavaMultiModalProjector(config),
        num_query=config.llamavid_num_query, frame_chunk=config.frame_chunk,
        input_norm=config.llamavid_text_decoder_input_norm, grid_pooling=config.llamavid_grid_pooling,
    )


def encode_instructions(tokenizer, instructions: list[str], max_length: int | None = None) -> dict:
    """The text decoder's inputs for each image's instruction, keeping the end of long ones (the
    question is at the end of a turn): ``instruction_input_ids`` / ``instruction_attention_mask``.
    ``max_length``: the model's (``config.llamavid_instruction_max_length``, the processor's
    ``instruction_max_length``); None: the tokenizer's own limit."""
    previous = tokenizer.truncation_side
    tokenizer.truncation_side = "left"
    try:
        encoded = tokenizer(list(instructions), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    finally:
        tokenizer.truncation_side = previous
    return {"instruction_input_ids": encoded["input_ids"], "instruction_attention_mask": encoded["attention_mask"]}


def load_text_decoder_from_instructblip(projector: LlamaVidProjector, path) -> None:
    """Start LLaMA-VID's text decoder from an InstructBLIP checkpoint's Q-Former and queries, and its input
    LayerNorm from the vision model's ``post_layernorm`` (the LayerNorm BLIP-2's Q-Former reads its features
    through: LAVIS's ``ln_vision``, which LLaMA-VID loads into ``vlm_att_ln``). Reads only those tensors from
    the safetensors files; raises if they do not fit (e.g. a vision tower of another width than
    InstructBLIP's, whose cross-attention could not load)."""
    from safetensors import safe_open

    folder = Path(path)
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    decoder, queries, input_norm = {}, None, {}
    for name in files:
        if not (folder / name).exists():
            raise FileNotFoundError(f"{folder}: no {name} (an InstructBLIP checkpoint in safetensors is needed)")
        with safe_open(folder / name, framework="pt") as handle:
            for key in handle.keys():
                bare = key.removeprefix("model.")
                if bare.startswith("qformer."):
                    decoder[bare[len("qformer."):]] = handle.get_tensor(key)
                elif bare == "query_tokens":
                    queries = handle.get_tensor(key)
                elif bare.startswith("vision_model.post_layernorm."):
                    input_norm[bare[len("vision_model.post_layernorm."):]] = handle.get_tensor(key)
    if not decoder or queries is None:
        raise ValueError(f"{folder}: no InstructBLIP Q-Former (qformer.*) and query_tokens found")
    expected = projector.text_decoder.state_dict()
    wrong = [k for k in decoder if k in expected and decoder[k].shape != expected[k].shape]
    missing = sorted(set(expected) - set(decoder))
    if wrong or missing:
        first = f"; {wrong[0]}: {tuple(decoder[wrong[0]].shape)} there, {tuple(expected[wrong[0]].shape)} here" if wrong else ""
        raise ValueError(
            f"{folder}: the InstructBLIP Q-Former does not fit this text decoder: shapes differ for {wrong[:3]}, "
            f"missing {missing[:3]}{first} (another vision tower width, text decoder vocabulary or size?)"
        )
    if queries.shape != projector.query_tokens.shape:
        raise ValueError(f"{folder}: query_tokens {tuple(queries.shape)}, this text decoder has {tuple(projector.query_tokens.shape)}")
    norm = projector.text_decoder_input_norm
    if norm is not None:
        if set(input_norm) != {"weight", "bias"}:
            raise ValueError(
                f"{folder}: no vision_model.post_layernorm for the text decoder's input LayerNorm (a Q-Former trained "
                "on features without it: build the model with --text_decoder_input_norm False)"
            )
        if input_norm["weight"].shape != norm.weight.shape:
            raise ValueError(f"{folder}: vision_model.post_layernorm is {tuple(input_norm['weight'].shape)}, the text "
                             f"decoder reads features of width {norm.weight.shape[0]}")
    projector.text_decoder.load_state_dict({k: v for k, v in decoder.items() if k in expected})
    with torch.no_grad():
        projector.query_tokens.copy_(queries)
        if norm is not None:
            norm.load_state_dict(input_norm)


class LlamaVidMethod(ImageProjector):
    """``mm_projector_type="llamavid"``: 1 context token plus the pooled content tokens per image or frame
    (images pool with ``llamavid_compress_type``, video frames with ``llamavid_video_compress_type``)."""

    reads_instruction = True
    pooling_refusal = "LLaMA-VID pools its content tokens with --compress_type / --video_compress_type"
    train_flags = ("text_decoder_tokenizer", "text_decoder_config", "text_decoder_path", "num_query", "compress_type",
                   "video_compress_type", "instruction_max_length", "freeze_text_decoder", "freeze_context_token",
                   "text_decoder_input_norm", "grid_pooling")

    def check_config(self, config) -> None:
        parse_compress_type(config.llamavid_compress_type)
        parse_compress_type(config.llamavid_video_compress_type)
        check_grid_pooling(config.llamavid_grid_pooling)

    def build(self, config) -> nn.Module:
        return build_llamavid_projector(config)

    def image_tokens(self, spec, is_frame: bool) -> int:
        """1 context token + the pooled patches (a CLS token the tower keeps is read by the text decoder only)."""
        grid = (spec.patch_rows, spec.patch_columns)
        return 1 + content_tokens_per_frame(spec.video_compress_type if is_frame else spec.compress_type,
                                            grid[0] * grid[1], grid, spec.grid_pooling)

    def encode(self, model, patches, images, grid):
        """Per image ``[1 + content, D]``: video frames pool with ``llamavid_video_compress_type``, images with
        ``llamavid_compress_type`` (docs/design.md §3). With ``vision_feature_select_strategy="full"`` the
        features start with CLS (``grid`` is then None): the text decoder reads it, nothing else does."""
        config = model.config
        cls_token = config.vision_feature_select_strategy == "full"
        if cls_token:
            from ..image_inputs import ImageTokenSpec

            spec = ImageTokenSpec.from_config(config)
            grid = (spec.patch_rows, spec.patch_columns)
        if images.instruction_input_ids is None or images.instruction_attention_mask is None:
            raise ValueError(
                "mm_projector_type='llamavid' needs instruction_input_ids / instruction_attention_mask: each image's "
                "instruction tokenized with the text decoder's tokenizer (the processor gives them)"
            )
        tokens: list[torch.Tensor | None] = [None] * len(images)
        for is_frame, spec in ((False, config.llamavid_compress_type), (True, config.llamavid_video_compress_type)):
            rows = (images.is_frame == is_frame).nonzero().squeeze(1)
            if len(rows) == 0:
                continue
            encoded = model.multi_modal_projector(
                patches[rows.to(patches.device)], images.instruction_input_ids[rows],
                images.instruction_attention_mask[rows], compress_type=spec, frame_chunk=config.frame_chunk, grid=grid,
                cls_token=cls_token, grid_pooling=config.llamavid_grid_pooling,
            )
            for row, image_tokens in zip(rows.tolist(), encoded):
                tokens[row] = image_tokens
        return tokens

    def processor_fields(self, config) -> dict:
        return {"llamavid_compress_type": config.llamavid_compress_type,
                "llamavid_video_compress_type": config.llamavid_video_compress_type,
                "llamavid_grid_pooling": config.llamavid_grid_pooling,
                "instruction_max_length": config.llamavid_instruction_max_length}

    def config_fields_from_flags(self, model_args, vision_config) -> dict:
        """The LLaMA-VID fields from its flags; refuses what cannot fit, from configs and tokenizers only.
        ``vision_config``: the vision tower's, to check an InstructBLIP Q-Former against."""
        if model_args.text_decoder_tokenizer is None:
            raise ValueError("--mm_projector_type llamavid needs --text_decoder_tokenizer (a BERT tokenizer directory)")
        try:
            check_grid_pooling(model_args.grid_pooling)
        except ValueError as error:
            raise ValueError(f"--grid_pooling: {error}") from None
        qformer = {}
        if model_args.text_decoder_path is not None:
            from transformers import InstructBlipConfig

            try:
                instructblip = InstructBlipConfig.from_pretrained(model_args.text_decoder_path)
            except (OSError, ValueError) as error:
                raise ValueError(f"--text_decoder_path {model_args.text_decoder_path}: {_one_line(error)}") from None
            if instructblip.num_query_tokens != model_args.num_query:
                raise ValueError(
                    f"--text_decoder_path: {model_args.text_decoder_path} has {instructblip.num_query_tokens} "
                    f"query_tokens, --num_query is {model_args.num_query}"
                )
            width = instructblip.qformer_config.encoder_hidden_size
            if vision_config is not None and width != vision_config.hidden_size:
                raise ValueError(
                    f"--text_decoder_path: the Q-Former of {model_args.text_decoder_path} cross-attends to vision "
                    f"features of width {width}; --vision_tower gives {vision_config.hidden_size}"
                )
            if model_args.text_decoder_config is None:
                qformer = instructblip.qformer_config.to_dict()
                for key in ("model_type", "encoder_hidden_size", "transformers_version", "architectures"):
                    qformer.pop(key, None)
        if model_args.text_decoder_config is not None:
            try:
                qformer = json.loads(Path(model_args.text_decoder_config).read_text())
            except (OSError, ValueError) as error:
                raise ValueError(f"--text_decoder_config {model_args.text_decoder_config}: {error}") from None
        try:
            vocab = len(AutoTokenizer.from_pretrained(model_args.text_decoder_tokenizer))
        except (OSError, ValueError) as error:
            raise ValueError(f"--text_decoder_tokenizer {model_args.text_decoder_tokenizer}: {_one_line(error)}") from None
        if qformer.get("vocab_size", vocab) < vocab:
            raise ValueError(f"--text_decoder_config vocab_size {qformer['vocab_size']} < the tokenizer's {vocab}")
        qformer.setdefault("vocab_size", vocab)
        return {
            "llamavid_num_query": model_args.num_query,
            "llamavid_qformer": qformer,
            "llamavid_compress_type": model_args.compress_type,
            "llamavid_video_compress_type": model_args.video_compress_type,
            "llamavid_instruction_max_length": model_args.instruction_max_length,
            "llamavid_text_decoder_input_norm": model_args.text_decoder_input_norm,
            "llamavid_grid_pooling": model_args.grid_pooling,
        }

    def init_from_flags(self, module: nn.Module, model_args) -> None:
        if model_args.text_decoder_path is not None:
            try:
                load_text_decoder_from_instructblip(module, model_args.text_decoder_path)
            except (ValueError, FileNotFoundError) as error:
                raise ValueError(f"--text_decoder_path: {error}") from None

    def freeze_from_flags(self, module: nn.Module, model_args) -> None:
        """LLaMA-VID's stage freezing (its ``bert_type`` suffixes): ``--freeze_text_decoder`` is ``_freeze``
        (the text decoder, its input LayerNorm and queries; stage 1, with ``--tune_mm_mlp_adapter``),
        ``--freeze_context_token`` is ``_freeze_all`` (all of the context token's modules, the content
        projector stays trainable; stage 3, long video)."""
        frozen = []
        if model_args.freeze_text_decoder or model_args.freeze_context_token:
            frozen += [module.text_decoder, module.text_decoder_input_norm]
            module.query_tokens.requires_grad_(False)
        if model_args.freeze_context_token:
            frozen += [module.query_projection, module.key_projection, module.context_projection]
        for part in frozen:
            if part is not None:
                part.requires_grad_(False)

    def prepare_processor(self, processor, model_args) -> None:
        processor.text_decoder_tokenizer = AutoTokenizer.from_pretrained(model_args.text_decoder_tokenizer)


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


__all__ = ["LlamaVidMethod", "LlamaVidProjector", "build_llamavid_projector", "encode_instructions",
           "load_text_decoder_from_instructblip"]
