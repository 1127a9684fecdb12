"""Checkpoints written by LLaMA-VID's own code (dvlab-research/LLaMA-VID, ``LlavaLlamaAttForCausalLM``) as our
classes.

LLaMA-VID's layout: a flat LLaMA (``model.embed_tokens``, ``model.layers.*``, ``model.norm``, ``lm_head``)
holding the LLaVA projector (``model.mm_projector.*``, the content tokens), the text decoder and context
attention (``model.vlm_att_encoder.bert.*``: LAVIS's Q-Former BERT; ``model.vlm_att_query``,
``model.vlm_att_projector``, ``model.vlm_att_key_projector``, ``model.vlm_att_val_projector``, and for
``bert_type`` ``qformer_pretrain*`` the Q-Former's input LayerNorm ``model.vlm_att_ln``) and, when saved with
it, the vision tower under ``model.vision_tower.vision_tower.*`` (EVA-ViT-G in LAVIS's layout, or a CLIP
model). Its ``config.json`` says ``model_type: "llava"`` with LLaMA-VID's fields (``bert_type``, ``num_query``,
``compress_type``, ``mm_*``); the BERT config and WordPiece vocabulary are bert-base-uncased's plus ``[DEC]``,
never saved with it. Images are one ``IMAGE_TOKEN_INDEX`` (-200) in the ids.

Ours: ``mm_projector_type="llamavid"`` with the same modules under ``model.multi_modal_projector``
(``text_decoder`` = transformers' ``InstructBlipQFormerModel``, ``query_tokens``, ``query_projection``,
``key_projection``, ``context_projection``, ``text_decoder_input_norm``, ``content_projector``), EVA-ViT-G as
transformers' ``InstructBlipVisionModel`` (the same network: LAVIS's ``q_bias``/``v_bias`` become one qkv bias
with zeros for the keys; our tower's ``post_layernorm`` is never read, since LLaMA-VID reads the last block's
output, ``vision_feature_layer=-1``, CLS kept: ``vision_feature_select_strategy="full"``), the text decoder's
tokenizer beside the processor, and an ``<image>`` token with an id (one row appended to the vocabulary when the
checkpoint's tokenizer has none). The converted model computes LLaMA-VID's tokens and logits
(tests/test_parity_llamavid.py, within 1e-5).

``convert_llamavid_original`` is used by ``scripts/convert_llamavid_checkpoint.py`` and, on the fly, by
``load_llamavid_original`` when ``llava_voco.engine.load_model`` (chat CLI, eval, server) is handed such a
folder (bert-base-uncased from a folder of that name beside its files, else by name; the tower from the
checkpoint or its ``mm_vision_tower`` path); the train entry refuses it naming the script. ``from_pretrained``
itself is not patched.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .llava_original import local_config, read_llava_state_dict

# LLaMA-VID's ``llava_llama_vid.LlavaConfig.model_type``: transformers' own Llava uses the same name, so a
# LLaMA-VID checkpoint is recognised by its fields, not by model_type alone
LLAMAVID_MODEL_TYPE = "llava"
LLAMAVID_ARCHITECTURE = "LlavaLlamaAttForCausalLM"
EVA_HEAD_DIM = 88  # EVA-ViT-G: 1408 wide, 16 heads (LLaMA-VID's EVAVisionTowerLavis: num_heads = 1408 // 88)
_TOWER = "model.vision_tower.vision_tower."
# LLaMA-VID's own config fields: not the language model's
_LLAMAVID_FIELDS = re.compile(
    r"^(mm_|image_|bert_type$|num_query$|compress_type$|max_token$|tune_|freeze_|use_mm_proj$|architectures$"
    r"|model_type$|transformers_version$|_name_or_path$|torch_dtype$)"
)
# LAVIS BERT (Q-Former) names -> transformers' InstructBlipQFormerModel names
_QFORMER_RENAMES = (
    (re.compile(r"^embeddings\.LayerNorm\."), "embeddings.layernorm."),
    (re.compile(r"^encoder\.layer\.(\d+)\.(attention|crossattention)\.self\."), r"encoder.layer.\1.\2.attention."),
)


class LlamaVidCheckpointError(ValueError):
    """A LLaMA-VID checkpoint this conversion cannot take; the message names the folder and what is wrong."""


def is_llamavid_original(path: str | Path) -> bool:
    """Whether ``path`` is a local folder holding a checkpoint written by LLaMA-VID's code."""
    config = local_config(path) or {}
    return config.get("model_type") == LLAMAVID_MODEL_TYPE and (
        "bert_type" in config or LLAMAVID_ARCHITECTURE in (config.get("architectures") or [])
    )


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """All weights of the folder (LLaMA-VID's releases are ``pytorch_model*.bin``), tensors only."""
    return read_llava_state_dict(path, error=LlamaVidCheckpointError)


def _read_tower_file(path: Path) -> dict[str, torch.Tensor]:
    """A vision tower's own weights (``eva_vit_g.pth`` or safetensors), keyed as the tower names them."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------------------------------------
# Vision tower
# ---------------------------------------------------------------------------------------------------
def _is_eva(tower: dict[str, torch.Tensor]) -> bool:
    return "cls_token" in tower and any(key.startswith("blocks.") for key in tower)


def eva_vision_config(tower: dict[str, torch.Tensor], num_heads: int | None = None):
    """``InstructBlipVisionConfig`` of a LAVIS EVA-ViT tower, from its weights' shapes (heads: EVA-ViT-G's
    head width 88 unless given)."""
    from transformers import InstructBlipVisionConfig

    width = tower["cls_token"].shape[-1]
    patch = tower["patch_embed.proj.weight"].shape[-1]
    grid = round((tower["pos_embed"].shape[1] - 1) ** 0.5)
    depth = 1 + max(int(key.split(".")[1]) for key in tower if key.startswith("blocks."))
    heads = num_heads or width // EVA_HEAD_DIM
    if heads < 1 or width % heads:
        raise LlamaVidCheckpointError(f"EVA tower of width {width}: give its number of heads (vision_num_heads)")
    return InstructBlipVisionConfig(
        hidden_size=width, intermediate_size=tower["blocks.0.mlp.fc1.weight"].shape[0], num_hidden_layers=depth,
        num_attention_heads=heads, image_size=grid * patch, patch_size=patch, hidden_act="gelu", layer_norm_eps=1e-6,
        qkv_bias=True,
    )


def eva_to_instructblip_vision(tower: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LAVIS EVA-ViT keys -> ``InstructBlipVisionModel`` keys. ``post_layernorm`` (not in EVA, never read: the
    features are the last block's output) is the identity LayerNorm."""
    out = {
        "embeddings.class_embedding": tower["cls_token"],
        "embeddings.position_embedding": tower["pos_embed"],
        "embeddings.patch_embedding.weight": tower["patch_embed.proj.weight"],
        "embeddings.patch_embedding.bias": tower["patch_embed.proj.bias"],
    }
    depth = 1 + max(int(key.split(".")[1]) for key in tower if key.startswith("blocks."))
    for layer in range(depth):
        block, ours = f"blocks.{layer}.", f"encoder.layers.{layer}."
        q_bias, v_bias = tower[block + "attn.q_bias"], tower[block + "attn.v_bias"]
        out[ours + "self_attn.qkv.weight"] = tower[block + "attn.qkv.weight"]
        out[ours + "self_attn.qkv.bias"] = torch.cat([q_bias, torch.zeros_like(q_bias), v_bias])  # EVA: no key bias
        for theirs, name in (("attn.proj", "self_attn.projection"), ("norm1", "layer_norm1"), ("norm2", "layer_norm2"),
                             ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
            out[ours + name + ".weight"] = tower[block + theirs + ".weight"]
            out[ours + name + ".bias"] = tower[block + theirs + ".bias"]
    width = tower["cls_token"].shape[-1]
    out["post_layernorm.weight"] = torch.ones(width, dtype=tower["cls_token"].dtype)
    out["post_layernorm.bias"] = torch.zeros(width, dtype=tower["cls_token"].dtype)
    return out


# ---------------------------------------------------------------------------------------------------
# Text decoder (Q-Former)
# ---------------------------------------------------------------------------------------------------
def qformer_state_dict(bert: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LAVIS Q-Former BERT keys (after ``vlm_att_encoder.bert.``) -> ``InstructBlipQFormerModel`` keys."""
    out = {}
    for key, value in bert.items():
        if key == "embeddings.position_ids":
            continue  # a buffer
        for pattern, replacement in _QFORMER_RENAMES:
            key = pattern.sub(replacement, key)
        out[key] = value
    return out


def qformer_config_fields(bert: dict[str, torch.Tensor], bert_config: dict | None, vision_width: int) -> dict:
    """``InstructBlipQFormerConfig`` fields of a LAVIS Q-Former: sizes from its weights, the rest (heads,
    activation, eps) from bert-base-uncased's config.json when given, else BERT's defaults (64-wide heads)."""
    bert_config = dict(bert_config or {})
    hidden = bert["embeddings.word_embeddings.weight"].shape[1]
    layers = 1 + max(int(key.split(".")[2]) for key in bert if key.startswith("encoder.layer."))
    cross = sorted({int(key.split(".")[2]) for key in bert if ".crossattention." in key})
    frequency = cross[1] - cross[0] if len(cross) > 1 else max(layers, 1)
    if cross and cross[0] != 0 or any(b - a != frequency for a, b in zip(cross, cross[1:])):
        raise LlamaVidCheckpointError(f"cross-attention in layers {cross}: not every n-th layer from the first")
    return {
        "vocab_size": bert["embeddings.word_embeddings.weight"].shape[0],
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": bert_config.get("num_attention_heads", hidden // 64),
        "intermediate_size": bert["encoder.layer.0.intermediate_query.dense.weight"].shape[0],
        "hidden_act": bert_config.get("hidden_act", "gelu"),
        "hidden_dropout_prob": bert_config.get("hidden_dropout_prob", 0.1),
        "attention_probs_dropout_prob": bert_config.get("attention_probs_dropout_prob", 0.1),
        "max_position_embeddings": bert["embeddings.position_embeddings.weight"].shape[0],
        "initializer_range": bert_config.get("initializer_range", 0.02),
        "layer_norm_eps": bert_config.get("layer_norm_eps", 1e-12),
        "pad_token_id": bert_config.get("pad_token_id", 0),
        "position_embedding_type": bert_config.get("position_embedding_type", "absolute"),
        "cross_attention_frequency": frequency,
        "encoder_hidden_size": vision_width,
    }


def bert_tokenizer(folder: str | Path):
    """LLaMA-VID's text decoder tokenizer: bert-base-uncased's WordPiece plus ``[DEC]`` as BOS (its
    ``init_bert``), truncating from the left as LLaMA-VID does."""
    from transformers import BertTokenizerFast

    local = Path(folder)
    if local.is_dir() and not (local / "vocab.txt").is_file() and not (local / "tokenizer.json").is_file():
        raise LlamaVidCheckpointError(f"{folder}: no vocab.txt / tokenizer.json of a BERT tokenizer (bert-base-uncased)")
    try:
        tokenizer = BertTokenizerFast.from_pretrained(str(folder), truncation_side="left")
    except OSError as error:
        raise LlamaVidCheckpointError(f"{folder}: cannot load the BERT tokenizer (bert-base-uncased): "
                                      f"{str(error).strip().splitlines()[0]}") from None
    if "[DEC]" not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    return tokenizer


# ---------------------------------------------------------------------------------------------------
# The whole checkpoint
# ---------------------------------------------------------------------------------------------------
def _text_config(original: dict, vocab_size: int):
    from transformers import LlamaConfig

    fields = {k: v for k, v in original.items() if not _LLAMAVID_FIELDS.match(k)}
    fields["vocab_size"] = vocab_size
    fields.pop("pretraining_tp", None)  # transformers 4.31's; the computation is the same at 1
    if fields.get("rope_scaling") is None:
        fields.pop("rope_scaling", None)  # 4.31 writes null
    return LlamaConfig(**fields)


def convert_llamavid_original(
    path: str | Path,
    bert_folder: str | Path,
    *,
    vision_tower: str | Path | None = None,
    vision_num_heads: int | None = None,
    tokenizer=None,
    dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
):
    """``(model, text_decoder_tokenizer, tokenizer)`` from a LLaMA-VID checkpoint folder.

    ``bert_folder``: bert-base-uncased's files (vocab.txt; its config.json if there), which LLaMA-VID loads by
    name and never saves. ``vision_tower``: the tower's weights when the checkpoint does not hold them
    (``eva_vit_g.pth``, or a CLIP model folder). ``tokenizer``: the LLM's (default: the folder's own, if any);
    ``<image>`` is added to it. ``dtype``: default the checkpoint's. Raises :class:`LlamaVidCheckpointError`
    naming what does not fit."""
    from transformers import AutoTokenizer, CLIPVisionConfig, CLIPVisionModel

    from .configuration_voco_llava import VoCoLlavaConfig
    from .modeling_voco_llava import VoCoLlavaForConditionalGeneration

    path = Path(path)
    if not is_llamavid_original(path):
        raise LlamaVidCheckpointError(f"{path}: not a LLaMA-VID checkpoint (config.json with model_type 'llava' and bert_type)")
    original = json.loads((path / "config.json").read_text())
    bert_type = original.get("bert_type", "qformer_pretrain")
    if "qformer" not in bert_type:
        raise LlamaVidCheckpointError(f"{path}: bert_type {bert_type!r}: only the Q-Former text decoders (qformer*) convert")
    if original.get("mm_projector_type", "linear") != "mlp2x_gelu":
        raise LlamaVidCheckpointError(
            f"{path}: mm_projector_type {original.get('mm_projector_type')!r}: our LLaMA-VID content projector is mlp2x_gelu"
        )
    if original.get("mm_use_im_start_end"):
        raise LlamaVidCheckpointError(f"{path}: mm_use_im_start_end=True (image start/end tokens) does not convert")
    state = read_state_dict(path)
    if any(key.startswith("model.vlm_att_bert_proj.") for key in state):
        raise LlamaVidCheckpointError(
            f"{path}: vlm_att_bert_proj (a Q-Former of another width than the vision tower) does not convert"
        )

    # vision tower
    tower = {key[len(_TOWER):]: value for key, value in state.items() if key.startswith(_TOWER)}
    tower_name = original.get("mm_vision_tower")
    for candidate in (vision_tower, tower_name):  # LLaMA-VID loads the tower from mm_vision_tower (eva_vit_g.pth)
        if not tower and candidate is not None and Path(candidate).is_file():
            tower = _read_tower_file(Path(candidate))
    if tower and _is_eva(tower):
        vision_config = eva_vision_config(tower, vision_num_heads)
        vision_state = eva_to_instructblip_vision(tower)
        feature_layer, strategy = -1, "full"  # EVA: the last block's output, CLS + patches
    else:
        folder = Path(vision_tower) if vision_tower is not None else Path(tower_name or "")
        if not (folder / "config.json").is_file():
            raise LlamaVidCheckpointError(
                f"{path}: the vision tower {tower_name!r} is not in the checkpoint; give its weights (eva_vit_g.pth) or "
                f"its CLIP folder as vision_tower"
            )
        vision_config = CLIPVisionConfig.from_pretrained(str(folder))
        if tower:
            vision_state = tower  # CLIPVisionModel's own names (vision_model.*)
        else:
            vision_state = CLIPVisionModel.from_pretrained(str(folder)).state_dict()
        feature_layer = original.get("mm_vision_select_layer", -2)
        strategy = "full" if original.get("mm_vision_select_feature", "patch") == "cls_patch" else "default"
    vision_width = vision_config.hidden_size
    if original.get("mm_hidden_size", vision_width) != vision_width:
        raise LlamaVidCheckpointError(f"{path}: mm_hidden_size {original['mm_hidden_size']}, its vision tower is {vision_width} wide")

    # text decoder
    bert = {key[len("model.vlm_att_encoder.bert."):]: value for key, value in state.items()
            if key.startswith("model.vlm_att_encoder.bert.")}
    if not bert:
        raise LlamaVidCheckpointError(f"{path}: no model.vlm_att_encoder.bert.* weights (the text decoder)")
    bert_config_file = Path(bert_folder) / "config.json"
    qformer = qformer_config_fields(bert, json.loads(bert_config_file.read_text()) if bert_config_file.is_file() else None,
                                    vision_width)
    text_decoder_tokenizer = bert_tokenizer(bert_folder)
    if len(text_decoder_tokenizer) != qformer["vocab_size"]:
        raise LlamaVidCheckpointError(
            f"{bert_folder}: the BERT tokenizer has {len(text_decoder_tokenizer)} tokens with [DEC], the checkpoint's text "
            f"decoder {qformer['vocab_size']} (another vocabulary than bert-base-uncased's?)"
        )
    qformer.pop("encoder_hidden_size")  # the model sets it from the tower

    # the LLM and <image>
    vocab_size = state["model.embed_tokens.weight"].shape[0]
    if tokenizer is None and any((path / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer is not None:
        if "<image>" not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
        image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    else:
        image_token_id = vocab_size
    rows = max(vocab_size, image_token_id + 1)

    compress_type = original.get("compress_type") or "none"
    config = VoCoLlavaConfig(
        vision_config=vision_config.to_dict(),
        text_config=_text_config(original, rows).to_dict(),
        image_token_id=image_token_id,
        vision_feature_layer=feature_layer,
        vision_feature_select_strategy=strategy,
        projector_hidden_act="gelu",
        mm_projector_type="llamavid",
        llamavid_num_query=state["model.vlm_att_query"].shape[1],
        llamavid_qformer=qformer,
        llamavid_compress_type=compress_type,
        llamavid_video_compress_type=compress_type,  # LLaMA-VID has one compress_type for images and frames
        llamavid_text_decoder_input_norm="model.vlm_att_ln.weight" in state,
        llamavid_grid_pooling="avg_pool",
        llamavid_instruction_max_length=256,
    )
    config.text_config.architectures = None

    def padded(weight: torch.Tensor) -> torch.Tensor:
        """The vocabulary with rows for the added tokens: their mean (never read: <image> takes features)."""
        if weight.shape[0] == rows:
            return weight
        return torch.cat([weight, weight.mean(0, keepdim=True).expand(rows - weight.shape[0], -1)])

    ours: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("model.vlm_att_") or key.startswith("model.mm_projector.") or key.startswith(_TOWER):
            continue
        if key.endswith(".rotary_emb.inv_freq"):
            continue  # a buffer transformers 4.31 saved; ours computes it
        if key == "model.embed_tokens.weight" or key == "lm_head.weight":
            value = padded(value)
        if key.startswith("model."):
            ours["model.language_model." + key[len("model."):]] = value
        elif key == "lm_head.weight":
            ours[key] = value
        else:
            raise LlamaVidCheckpointError(f"{path}: unexpected weight {key}")
    ours.update({"model.vision_tower." + key: value for key, value in vision_state.items()})
    projector = "model.multi_modal_projector."
    ours.update({projector + "text_decoder." + key: value for key, value in qformer_state_dict(bert).items()})
    ours[projector + "query_tokens"] = state["model.vlm_att_query"]
    for theirs, name in (("vlm_att_projector", "query_projection"), ("vlm_att_key_projector", "key_projection"),
                         ("vlm_att_val_projector", "context_projection"), ("vlm_att_ln", "text_decoder_input_norm"),
                         ("mm_projector.0", "content_projector.linear_1"), ("mm_projector.2", "content_projector.linear_2")):
        for part in ("weight", "bias"):
            if f"model.{theirs}.{part}" in state:
                ours[f"{projector}{name}.{part}"] = state[f"model.{theirs}.{part}"]

    dtype = dtype or state["model.embed_tokens.weight"].dtype
    model = VoCoLlavaForConditionalGeneration._from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    model_state = model.state_dict()
    if not any(key.startswith("model.vision_tower.vision_model.") for key in model_state):
        # transformers' CLIPVisionModel under Llava is keyed without its vision_model. prefix
        ours = {key.replace("model.vision_tower.vision_model.", "model.vision_tower.", 1): value for key, value in ours.items()}
    missing = sorted(set(model_state) - set(ours))
    unexpected = sorted(set(ours) - set(model_state))
    wrong = [k for k in ours if k in model_state and ours[k].shape != model_state[k].shape]
    if missing or unexpected or wrong:
        raise LlamaVidCheckpointError(
            f"{path}: converted weights do not fit: missing {missing[:4]}, unexpected {unexpected[:4]}, "
            f"shapes differ for {[(k, tuple(ours[k].shape), tuple(model_state[k].shape)) for k in wrong[:3]]}"
        )
    model.load_state_dict(ours, strict=True)
    return model.eval(), text_decoder_tokenizer, tokenizer


def bert_folder_for(path: str | Path) -> str:
    """Where the on-the-fly loaders find bert-base-uncased (LLaMA-VID loads it by that name): a
    ``bert-base-uncased`` folder beside the checkpoint's files, else the name itself (transformers' cache)."""
    local = Path(path) / "bert-base-uncased"
    return str(local) if local.is_dir() else "bert-base-uncased"


def load_llamavid_original(path: str | Path, *, dtype: torch.dtype | None = None, attn_implementation: str | None = None):
    """Model and processor of a LLaMA-VID folder, converted in memory (the loaders' on-the-fly path); the folder
    must hold the LLM's tokenizer and its vision tower (or name it in ``mm_vision_tower``)."""
    model, text_decoder_tokenizer, tokenizer = convert_llamavid_original(
        path, bert_folder_for(path), dtype=dtype, attn_implementation=attn_implementation,
    )
    if tokenizer is None:
        raise LlamaVidCheckpointError(f"{path}: a LLaMA-VID checkpoint without its tokenizer: nothing to build a processor from")
    return model, processor_for_converted(model.config, tokenizer, text_decoder_tokenizer)


def processor_for_converted(config, tokenizer, text_decoder_tokenizer):
    """The processor of a converted checkpoint: LLaMA-VID's CLIP preprocessing (its
    ``llamavid/processor/clip-patch14-*``: resize and centre-crop to the tower's size, CLIP's mean and std),
    the Vicuna v1 template (``imgsp_v1`` / ``vicuna_v1``, the released models'), and the text decoder's
    tokenizer."""
    from transformers import CLIPImageProcessor

    from ..conversation import get_template
    from .processing_voco_llava import VoCoLlavaProcessor

    size = config.vision_config.image_size
    processor = VoCoLlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}),
        tokenizer=tokenizer,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        chat_template=get_template("v1").chat_template(),
        num_additional_image_tokens=1,
        mm_projector_type="llamavid",
        llamavid_compress_type=config.llamavid_compress_type,
        llamavid_video_compress_type=config.llamavid_video_compress_type,
        instruction_max_length=config.llamavid_instruction_max_length,
    )
    processor.text_decoder_tokenizer = text_decoder_tokenizer
    return processor
