"""Make tests/fixtures/parity_llamavid/ with LLaMA-VID's released code (see the README there).

Runs in a separate environment with transformers 4.31 (the original's), never in the package's own: it
imports the original modules from a checkout of dvlab-research/LLaMA-VID given on the command line, builds
two tiny models with them, and writes each as a checkpoint in the original layout (``config.json`` with
LLaMA-VID's fields, ``model.safetensors`` with its key names) plus the inputs and the outputs the original
code computes (context and content tokens, LLM logits). Nothing of the original is copied into this
repository: only these outputs, made from seeded random weights.

    python scripts/parity/llamavid_reference.py --llamavid-src /path/to/LLaMA-VID --out tests/fixtures/parity_llamavid

Set-ups:
* ``released``: ``bert_type="qformer_pretrain"`` on EVA-ViT-G-like features (the set-up of every released
  LLaMA-VID model): the tower gives CLS + patches, the Q-Former reads ``vlm_att_ln`` of them, context
  attention and content pooling drop CLS.
* ``qformer``: ``bert_type="qformer"`` on a CLIP tower (``mm_vision_select_feature="patch"``: CLS dropped by
  the tower), no input LayerNorm.

Work-arounds, all here and none in the original: ``initialize_attention_modules`` downloads
bert-base-uncased and hard-codes EVA-ViT-G's width 1408 for ``qformer_pretrain``; this script builds the same
modules the same way (``init_bert``'s calls, ``vlm_att_*`` names) at a tiny width equal to the tower's, so
that, as in the released models, there is no ``vlm_att_bert_proj``. The EVA tower is the original
``VisionTransformer`` at a tiny size (``EVAVisionTowerLavis`` hard-codes depth 39). timm is replaced by its
four trivial helpers when it is not importable (timm needs a torchvision that matches the CPU torch).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import types
from functools import partial
from pathlib import Path

SEED = 0
NUM_QUERY = 4
IMAGE_SIZE, PATCH_SIZE = 42, 7  # a 6 x 6 patch grid: grid:4 pools it to 36 tokens in the original, 16 adaptively
LLM_VOCAB = 96
WORDS = (
    "what is in the image describe colors how many cats are there ? . , a the of and red blue green dog "
    "on table is it left right count shapes answer with single word video happens first then"
).split()
PROMPTS = {
    # image 0: two human turns, so two copies of the image (imgsp_v1), each guided by its turn
    "image0": ["What is in the image?", "Describe the colors.\nAnswer with a single word."],
    "image1": ["how many cats are there"],
    "video": ["What happens in the video first?"],
}
COMPRESS_TYPES = ("none", "mean", "grid:2", "grid:4")


def stub_timm_if_missing() -> None:
    """eva_vit.py imports four helpers from timm; with no usable timm, give it torch's equivalents."""
    try:
        import timm.models.layers  # noqa: F401
        import timm.models.registry  # noqa: F401
        return
    except Exception:
        pass
    import torch

    def drop_path(x, drop_prob=0.0, training=False):
        if drop_prob == 0.0 or not training:
            return x
        raise NotImplementedError("drop path is off in this fixture")

    layers = types.ModuleType("timm.models.layers")
    layers.drop_path = drop_path
    layers.to_2tuple = lambda value: tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    layers.trunc_normal_ = lambda tensor, mean=0.0, std=1.0, a=-2.0, b=2.0: torch.nn.init.trunc_normal_(tensor, mean, std, a, b)
    registry = types.ModuleType("timm.models.registry")
    registry.register_model = lambda fn: fn
    models = types.ModuleType("timm.models")
    models.layers, models.registry = layers, registry
    timm = types.ModuleType("timm")
    timm.models = models
    sys.modules.update({"timm": timm, "timm.models": models, "timm.models.layers": layers, "timm.models.registry": registry})


def write_bert_folder(folder: Path, width: int):
    """A tiny stand-in for bert-base-uncased: vocab.txt and config.json (what init_bert reads)."""
    from transformers import BertConfig

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(dict.fromkeys(WORDS)) + ["?", "."]
    (folder / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    config = BertConfig(
        vocab_size=len(dict.fromkeys(vocab)), hidden_size=width, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=2 * width, max_position_embeddings=64,
    )
    config.save_pretrained(folder)
    return config


def build_model(setup: str, out: Path, torch):
    from torch import nn
    from transformers import BertTokenizer, CLIPVisionConfig, CLIPVisionModel

    from llamavid.model.language_model.llava_llama_vid import LlavaConfig, LlavaLlamaAttForCausalLM
    from llamavid.model.multimodal_encoder.clip_encoder import CLIPVisionTower
    from llamavid.model.multimodal_encoder.eva_vit import EVAVisionTowerLavis, VisionTransformer
    from llamavid.model.multimodal_projector.builder import build_vision_projector
    from llamavid.model.qformer import BertLMHeadModel as BertLMHeadModelQF

    torch.manual_seed(SEED)
    vision_width, llm_width = 24, 32
    config = LlavaConfig(
        vocab_size=LLM_VOCAB, hidden_size=llm_width, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=512, rms_norm_eps=1e-6, pad_token_id=0,
    )
    model = LlavaLlamaAttForCausalLM(config)
    inner = model.get_model()

    if setup == "released":
        tower = EVAVisionTowerLavis.__new__(EVAVisionTowerLavis)
        nn.Module.__init__(tower)
        tower.vision_tower = VisionTransformer(
            img_size=IMAGE_SIZE, patch_size=PATCH_SIZE, use_mean_pooling=False, embed_dim=vision_width, depth=2,
            num_heads=2, mlp_ratio=4.3637, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6),
        )
        tower.is_loaded, tower.out_channel, tower.patch_size = True, vision_width, PATCH_SIZE
        config.mm_vision_tower = "./model_zoo/LAVIS/eva_vit_g.pth"
        config.image_processor = "./llamavid/processor/clip-patch14-224"
        bert_type = "qformer_pretrain"
    else:
        clip = CLIPVisionConfig(
            hidden_size=vision_width, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2,
            image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=vision_width,
        )
        tower = CLIPVisionTower.__new__(CLIPVisionTower)
        nn.Module.__init__(tower)
        tower.vision_tower = CLIPVisionModel(clip)
        tower.is_loaded, tower.select_layer, tower.select_feature = True, -2, "patch"
        tower.vision_tower_name = "./model_zoo/OpenAI/clip-vit-large-patch14"
        config.mm_vision_tower = tower.vision_tower_name
        bert_type = "qformer"
    inner.vision_tower = tower

    # initialize_vision_modules' config fields and projector
    config.use_mm_proj = True
    config.mm_projector_type = "mlp2x_gelu"
    config.mm_hidden_size = vision_width
    config.mm_vision_select_layer = -2
    config.mm_vision_select_feature = "patch"
    config.max_token = 2048
    config.mm_use_im_start_end = False
    config.mm_use_im_patch_token = False
    config.image_aspect_ratio = "pad"
    config.tune_mm_mlp_adapter = False
    inner.mm_projector = build_vision_projector(config)

    # initialize_attention_modules / init_bert, at the tower's width (see the module docstring)
    config.bert_type, config.num_query, config.compress_type = bert_type, NUM_QUERY, None
    bert_folder = out.parent / "bert-base-uncased"  # one stand-in for both set-ups
    encoder_config = write_bert_folder(bert_folder, width=32)
    tokenizer = BertTokenizer.from_pretrained(str(bert_folder), truncation_side="left")
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    encoder_config.encoder_width = vision_width
    encoder_config.add_cross_attention = True
    encoder_config.cross_attention_freq = 2
    encoder = BertLMHeadModelQF(encoder_config)
    encoder.resize_token_embeddings(len(tokenizer))
    encoder.cls = None
    inner.vlm_att_tokenlizer, inner.vlm_att_encoder = tokenizer, encoder
    inner.vlm_att_query = nn.Parameter(torch.zeros(1, NUM_QUERY, encoder_config.hidden_size))
    inner.vlm_att_query.data.normal_(mean=0.0, std=encoder_config.initializer_range)
    inner.vlm_att_projector = nn.Linear(encoder_config.hidden_size, vision_width)
    inner.vlm_att_key_projector = nn.Linear(vision_width, vision_width)
    inner.vlm_att_val_projector = nn.Linear(vision_width, llm_width)
    inner.vlm_att_bert_proj = None
    if "qformer_pretrain" in bert_type:
        inner.vlm_att_ln = nn.LayerNorm(vision_width)

    # No parameter stays at a trivial value (zero biases, unit LayerNorms would hide a missing term)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.add_(torch.randn_like(parameter) * (0.05 if parameter.ndim < 2 else 0.02))
    return model.float().eval(), tokenizer


def run_setup(setup: str, out: Path, torch) -> dict:
    from llamavid.constants import IMAGE_TOKEN_INDEX

    folder = out / setup
    folder.mkdir(parents=True, exist_ok=True)
    model, tokenizer = build_model(setup, folder, torch)
    generator = torch.Generator().manual_seed(SEED + 1)
    # Stored as bytes (images are), read as pixel / 127.5 - 1 on both sides: exact in float32
    image_bytes = torch.randint(0, 256, (2, 3, IMAGE_SIZE, IMAGE_SIZE), generator=generator, dtype=torch.uint8)
    video_bytes = torch.randint(0, 256, (2, 3, IMAGE_SIZE, IMAGE_SIZE), generator=generator, dtype=torch.uint8)
    pixel_values, video = image_bytes.float() / 127.5 - 1, video_bytes.float() / 127.5 - 1  # image0, image1; 2 frames
    expected = {"image_bytes": image_bytes, "video_bytes": video_bytes}

    with torch.no_grad():
        features = model.get_model().get_vision_tower()(pixel_values)
        expected["vision_features"] = features  # what the tower gives (CLS + patches for EVA)
        for prompt_name in ("image0", "image1", "video"):
            encoded = tokenizer(PROMPTS[prompt_name], padding="longest", truncation=True, max_length=256, return_tensors="pt")
            expected[f"{prompt_name}.instruction_input_ids"] = encoded.input_ids
            expected[f"{prompt_name}.instruction_attention_mask"] = encoded.attention_mask
        for compress_type in COMPRESS_TYPES:
            model.config.compress_type = None if compress_type == "none" else compress_type
            key = compress_type.replace(":", "")
            images = model.encode_images(pixel_values, prompts=[PROMPTS["image0"], PROMPTS["image1"]])
            frames = model.encode_images(video, prompts=[PROMPTS["video"]], image_counts=[len(video)])[0]
            per_frame = frames.reshape(len(video), -1, frames.shape[-1])  # [frames, 1 + n, D]
            for name, tokens in (("image0", images[0]), ("image1", images[1]), ("video", per_frame)):  # [copies, 1 + n, D]
                expected.setdefault(f"{name}.context", tokens[:, :1])  # the same for every compress type
                expected[f"{key}.{name}.content"] = tokens[:, 1:]

        # LLM logits through the original forward, the checkpoint's own compress type (None: every patch)
        model.config.compress_type = None
        sequences = {
            "image0": [1, 5, 6, IMAGE_TOKEN_INDEX, 7, 8, 9, 10, IMAGE_TOKEN_INDEX, 11, 12],  # two turns, two copies
            "image1": [1, 5, IMAGE_TOKEN_INDEX, 13, 14, 15],
        }
        for index, (name, ids) in enumerate(sequences.items()):
            input_ids = torch.tensor([ids])
            logits = model(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids), images=pixel_values[index : index + 1],
                prompts=[PROMPTS[name]], use_cache=False, return_dict=True,
            ).logits
            expected[f"{name}.input_ids"] = input_ids
            expected[f"{name}.logits"] = logits

    from safetensors.torch import save_file

    model.save_pretrained(folder, safe_serialization=True)
    save_file({k: v.contiguous() for k, v in expected.items()}, str(folder / "expected.safetensors"))
    return {"prompts": PROMPTS, "compress_types": list(COMPRESS_TYPES), "image_token_index": IMAGE_TOKEN_INDEX}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llamavid-src", required=True, type=Path, help="checkout of dvlab-research/LLaMA-VID")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    import torch
    import transformers  # before the timm stand-in: transformers looks for timm's package spec

    stub_timm_if_missing()
    sys.path.insert(0, str(args.llamavid_src.resolve()))

    torch.use_deterministic_algorithms(True)
    try:
        commit = subprocess.run(["git", "-C", str(args.llamavid_src), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        commit = "unknown (not a git checkout)"
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"llamavid_commit": commit, "transformers": transformers.__version__, "torch": torch.__version__, "seed": SEED}
    for setup in ("released", "qformer"):
        meta[setup] = run_setup(setup, args.out, torch)
    (args.out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(json.dumps(meta, indent=1))


if __name__ == "__main__":
    main()
