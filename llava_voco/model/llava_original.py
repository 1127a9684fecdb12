"""Checkpoints written by LLaVA's own ``train.py`` (``model_type: llava_llama`` / ``llava_mistral``) as our classes.

LLaVA's layout: one flat language model (``model.embed_tokens``, ``model.layers.*``, ``model.norm``,
``lm_head``) with the projector inside it (``model.mm_projector.*``) and, when it was saved at all, the CLIP
tower under ``model.vision_tower.vision_tower.*``; its config is the LLM's plus ``mm_*`` fields, the tower
named by ``mm_vision_tower`` (usually a Hub name: LLaVA re-loads the tower from there and its released
checkpoints do not carry it). Images are one ``IMAGE_TOKEN_INDEX`` (-200) in the ids, outside the vocabulary.

Ours is transformers' Llava (llava-hf) layout: ``model.language_model.*``, ``model.vision_tower.*``,
``model.multi_modal_projector.*``, and an ``<image>`` token with an id: the conversion appends one row to the
vocabulary for it (``image_token_id`` = LLaVA's vocabulary size; its rows are the mean of the others, as
``add_special_tokens_with_mean_rows`` does, and never read: image positions take the image's features).
Logits over LLaVA's vocabulary are LLaVA's (tests/test_parity_llava.py).

``convert_llava_original`` is used by ``scripts/convert_llava_checkpoint.py`` and, on the fly
(``load_llava_original``), by the loaders ``llava_voco.engine.load_model`` / ``llava_voco.inference.load_model``
(chat, model_vqa, serve) when handed such a folder; the training entry refuses
one naming the script. ``from_pretrained`` itself is not patched (that would mean patching transformers).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from transformers import AutoConfig, CLIPVisionConfig, CLIPVisionModel

from ..constants import IMAGE_PLACEHOLDER, VOCO_TOKEN
from .configuration_voco_llava import VoCoLlavaConfig
from .modeling_voco_llava import VoCoLlavaForConditionalGeneration
from .processing_voco_llava import VoCoLlavaProcessor
from .projectors import llava_projector_state_dict

LLAVA_MODEL_TYPES = {"llava_llama": "llama", "llava_mistral": "mistral"}
# LLaVA's own config fields (llava_arch.py, train.py): not the language model's
_LLAVA_FIELDS = re.compile(r"^(mm_|image_|tokenizer_|tune_|freeze_|use_mm_proj|unfreeze_|s2|architectures$|model_type$"
                           r"|transformers_version$|_name_or_path$|torch_dtype$|voco_)")
_TOWER_IN_CHECKPOINT = "model.vision_tower.vision_tower."
RELEASED_VOCO_TOKENS = 2  # VoCo-LLaMA's released code (train_compress.py, model_vqa_loader.py) writes 2 <voco>


class LlavaCheckpointError(ValueError):
    """A LLaVA-format checkpoint this conversion cannot take; the message names the folder and what is missing."""


def local_config(path: str | Path) -> dict | None:
    """A local folder's ``config.json``, or None when there is none (a Hub id, another kind of folder)."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return None
    try:
        return json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def is_llava_original(path: str | Path) -> bool:
    """Whether ``path`` is a local folder holding a checkpoint in LLaVA's own format."""
    return (local_config(path) or {}).get("model_type") in LLAVA_MODEL_TYPES


def read_llava_state_dict(path: Path, error: type[ValueError] = None) -> dict[str, torch.Tensor]:
    """All weights of the folder (LLaVA's or LLaMA-VID's releases): safetensors (single or sharded), else
    ``pytorch_model*.bin`` read with ``weights_only=True`` (tensors only, no code). ``error``: raised, naming the
    folder, when there are no weights (default ``LlavaCheckpointError``)."""
    from safetensors.torch import load_file

    files = sorted(path.glob("model*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    if not files:
        raise (error or LlavaCheckpointError)(f"{path}: no model*.safetensors or pytorch_model*.bin weights")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        if file.suffix == ".safetensors":
            state.update(load_file(str(file)))
        else:
            state.update(torch.load(file, map_location="cpu", weights_only=True))
    return state


def _tower_folder(path: Path, name: str | None, vision_tower: str | Path | None) -> Path:
    """The CLIP folder the tower's config (and, when the checkpoint lacks them, its weights) come from."""
    for candidate in (vision_tower, name and path / name, name):
        if candidate and (Path(candidate) / "config.json").is_file():
            return Path(candidate)
    raise LlavaCheckpointError(
        f"{path}: its vision tower mm_vision_tower={name!r} is not a local folder (LLaVA loads it by name and its "
        "checkpoints do not carry it): pass the CLIP tower's folder (--vision-tower PATH)"
    )


def convert_llava_original(
    path: str | Path,
    *,
    vision_tower: str | Path | None = None,
    voco_tokens: int | None = None,
    voco_token_id: int | None = None,
    voco_mask_mode: str | None = None,
    dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
) -> VoCoLlavaForConditionalGeneration:
    """The checkpoint in ``path`` (LLaVA's layout) as a ``VoCoLlavaForConditionalGeneration``.

    ``vision_tower``: the CLIP folder when ``mm_vision_tower`` is not a local path (a Hub name). VoCo: by default
    a checkpoint whose tokenizer (or config, ``voco_token_id``) has ``<voco>`` is taken as the released
    VoCo-LLaMA code's (``voco_tokens=2``, ``voco_mask_mode="official"``), any other as plain LLaVA.
    """
    path = Path(path)
    raw = json.loads((path / "config.json").read_text())
    model_type = raw.get("model_type")
    if model_type not in LLAVA_MODEL_TYPES:
        raise LlavaCheckpointError(f"{path}: model_type {model_type!r} is not one of LLaVA's {sorted(LLAVA_MODEL_TYPES)}")
    merge = raw.get("mm_patch_merge_type", "flat")
    if merge != "flat" or raw.get("mm_use_im_start_end") or raw.get("mm_use_im_patch_token"):
        raise LlavaCheckpointError(
            f"{path}: mm_patch_merge_type={merge!r}, mm_use_im_start_end={raw.get('mm_use_im_start_end')}, "
            f"mm_use_im_patch_token={raw.get('mm_use_im_patch_token')}: only LLaVA-1.5's flat layout without "
            "image start/end or patch tokens converts"
        )
    select_feature = raw.get("mm_vision_select_feature", "patch")
    if select_feature not in ("patch", "cls_patch"):
        raise LlavaCheckpointError(f"{path}: mm_vision_select_feature={select_feature!r} (patch or cls_patch)")
    if voco_token_id is None:
        voco_token_id = raw.get("voco_token_id")
        tokenizer = _tokenizer(path)
        if voco_token_id is None and tokenizer is not None and VOCO_TOKEN in tokenizer.get_vocab():
            voco_token_id = tokenizer.convert_tokens_to_ids(VOCO_TOKEN)
    if voco_tokens is None:  # the released VoCo-LLaMA code: <voco> in the vocabulary, k = 2, its mask
        voco_tokens = RELEASED_VOCO_TOKENS if voco_token_id is not None else 0
        voco_mask_mode = voco_mask_mode or ("official" if voco_tokens else "paper")
    voco_mask_mode = voco_mask_mode or "paper"
    if voco_tokens > 0 and voco_token_id is None:
        raise LlavaCheckpointError(f"{path}: voco_tokens={voco_tokens} but no {VOCO_TOKEN} in its tokenizer: give its id")
    if voco_tokens == 0:
        voco_token_id = None
    text_values = {key: value for key, value in raw.items() if not _LLAVA_FIELDS.match(key)}
    text_config = AutoConfig.for_model(LLAVA_MODEL_TYPES[model_type], **text_values)
    vocab_size = text_config.vocab_size

    state = read_llava_state_dict(path)
    tower_state = {key[len(_TOWER_IN_CHECKPOINT):]: value for key, value in state.items()
                   if key.startswith(_TOWER_IN_CHECKPOINT)}
    folder = _tower_folder(path, raw.get("mm_vision_tower"), vision_tower)
    vision_config = CLIPVisionConfig.from_pretrained(folder)
    if not tower_state:
        tower_state = CLIPVisionModel.from_pretrained(folder).state_dict()

    image_token_id = vocab_size  # a row appended to LLaVA's vocabulary
    config = VoCoLlavaConfig(
        text_config=text_config.to_dict() | {"vocab_size": vocab_size + 1},
        vision_config=vision_config.to_dict(),
        image_token_id=image_token_id,
        vision_feature_layer=raw.get("mm_vision_select_layer", -2),
        vision_feature_select_strategy="default" if select_feature == "patch" else "full",
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        mm_projector_type=raw.get("mm_projector_type", "linear"),
        voco_tokens=voco_tokens,
        voco_token_id=voco_token_id,
        voco_mask_mode=voco_mask_mode,
    )
    config.architectures = ["VoCoLlavaForConditionalGeneration"]

    converted: dict[str, torch.Tensor] = {}
    projector = {key: value for key, value in state.items() if key.startswith("model.mm_projector.")}
    for key, value in llava_projector_state_dict(projector, config.mm_projector_type, str(path)).items():
        converted[f"model.multi_modal_projector.{key}"] = value
    for key, value in tower_state.items():
        converted["model.vision_tower." + key.removeprefix("vision_model.")] = value
    unknown = []
    for key, value in state.items():
        if key.startswith(("model.mm_projector.", _TOWER_IN_CHECKPOINT)):
            continue
        if key == "lm_head.weight":
            converted[key] = value
        elif key.startswith("model.") and not key.startswith("model.image_newline"):
            converted["model.language_model." + key[len("model."):]] = value
        else:
            unknown.append(key)
    if unknown:
        raise LlavaCheckpointError(f"{path}: weights LLaVA-1.5's layout does not have: {', '.join(sorted(unknown)[:5])}")
    for key in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        if key in converted:  # the <image> row: the mean of LLaVA's rows (never read at image positions)
            rows = converted[key]
            converted[key] = torch.cat([rows, rows.float().mean(0, keepdim=True).to(rows.dtype)])

    dtype = dtype or converted["model.language_model.embed_tokens.weight"].dtype
    model = VoCoLlavaForConditionalGeneration._from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    missing, unexpected = model.load_state_dict(converted, strict=False)
    missing = [key for key in missing if not (key == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise LlavaCheckpointError(f"{path}: missing {missing[:5]}, unexpected {unexpected[:5]} after conversion")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def _tokenizer(path: Path):
    """The checkpoint's tokenizer (LLaVA's train.py saves it beside the weights), or None."""
    if not any((path / name).is_file() for name in ("tokenizer_config.json", "tokenizer.model", "tokenizer.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def llava_processor(path: str | Path, model: VoCoLlavaForConditionalGeneration,
                    vision_tower: str | Path | None = None) -> VoCoLlavaProcessor | None:
    """The processor for a converted checkpoint: its tokenizer with ``<image>`` as the appended row, the tower's
    image processor. None when the folder has no tokenizer."""
    from transformers import AddedToken, CLIPImageProcessor

    path = Path(path)
    tokenizer = _tokenizer(path)
    if tokenizer is None:
        return None
    raw = json.loads((path / "config.json").read_text())
    tokenizer.add_tokens([AddedToken(IMAGE_PLACEHOLDER, special=True, normalized=False)], special_tokens=True)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    if image_id != model.config.image_token_id:
        raise LlavaCheckpointError(
            f"{path}: its tokenizer has {len(tokenizer) - 1} tokens but the model {model.config.image_token_id} rows: "
            f"{IMAGE_PLACEHOLDER} would get id {image_id}, not the row the conversion appended"
        )
    image_processor = CLIPImageProcessor.from_pretrained(_tower_folder(path, raw.get("mm_vision_tower"), vision_tower))
    return VoCoLlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=model.config.vision_config.patch_size,
        vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        num_additional_image_tokens=1,  # CLIP's CLS
        voco_tokens=model.config.voco_tokens,
    )


def load_llava_original(path: str | Path, *, dtype: torch.dtype | None = None,
                        attn_implementation: str | None = None) -> tuple[VoCoLlavaForConditionalGeneration, VoCoLlavaProcessor]:
    """Model and processor of a LLaVA-format folder, converted in memory (the loaders' on-the-fly path)."""
    model = convert_llava_original(path, dtype=dtype, attn_implementation=attn_implementation)
    processor = llava_processor(path, model)
    if processor is None:
        raise LlavaCheckpointError(f"{path}: a LLaVA checkpoint without its tokenizer: nothing to build a processor from")
    return model, processor


def llava_ids(input_ids: torch.Tensor, attention_mask: torch.Tensor, *, image_index: int, image_token_id: int,
              tokens_per_image: int, pad_token_id: int = 0, padding_side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    """LLaVA's ids (one ``image_index`` per image) as ours: ``tokens_per_image`` image tokens each, rows padded
    again to a common length on ``padding_side`` (LLaVA splices the features in and pads the same way)."""
    rows = []
    for ids, mask in zip(input_ids, attention_mask.bool()):
        row = []
        for token in ids[mask].tolist():
            row.extend([image_token_id] * tokens_per_image if token == image_index else [token])
        rows.append(row)
    length = max(len(row) for row in rows)
    out_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    out_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for index, row in enumerate(rows):
        span = slice(length - len(row), length) if padding_side == "left" else slice(0, len(row))
        out_ids[index, span] = torch.tensor(row)
        out_mask[index, span] = 1
    return out_ids, out_mask
