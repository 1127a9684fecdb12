"""The DigitGrid demo's tiny base models, in the layouts the train entry reads (set-up (a)).

    base/llm/            a LlamaForCausalLM (random init) with a SentencePiece tokenizer trained on the data's text
    base/vision_tower/   a CLIPVisionModel pretrained here ("stage 0") and its CLIP image processor
    base/text_decoder_tokenizer/, base/text_decoder.json   LLaMA-VID's BERT WordPiece tokenizer and Q-Former size

Nothing pretrained can be downloaded here, and docs/design.md §5 found that a LLaVA whose vision tower starts from
random weights stays at chance for a long time. Real LLaVA starts from a pretrained CLIP; so does this
demo, from a tiny one pretrained for a few seconds on the *train* grids to name the digit of each
quadrant from the patch tokens (``pretrain_vision_tower``). Test images are never seen.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaTokenizer,
)

from ..conversation import get_template
from .tiny import LLAVA_V1_CHAT_TEMPLATE, train_wordpiece_tokenizer
from ..image_io import load_image


@dataclass
class BaseSizes:
    """Sizes of the demo's models (docs/design.md §5's calibration model: ViT 3 x 96, patch 4 on 32 px, Llama 4 x 128)."""

    image_size: int = 32
    patch_size: int = 4  # 64 vision tokens per image
    vision_hidden: int = 96
    vision_layers: int = 3
    vision_heads: int = 4
    text_hidden: int = 128
    text_layers: int = 4
    text_heads: int = 4
    vocab_size: int = 512  # 256 of them byte-fallback pieces
    qformer_hidden: int = 64  # LLaMA-VID's text decoder
    qformer_layers: int = 2
    vision_pretrain_steps: int = 400
    vision_pretrain_images: int = 4000  # the first train grids (stage 0 sees 400 x 64 of them)
    vision_pretrain_batch: int = 64
    seed: int = 0


def corpus_from_data(data_dir: Path) -> list[str]:
    """Every line of text the model will read: the conversations of train.json and the v1 system prompt."""
    samples = json.loads((data_dir / "train.json").read_text())
    template = get_template("v1")
    lines = [template.system, "USER: ASSISTANT:"]
    for sample in samples:
        for turn in sample["conversations"]:
            lines.append(turn["value"].replace("<image>", "").replace("<video>", "").strip())
    return lines


def train_sentencepiece_tokenizer(corpus: list[str], folder: Path, vocab_size: int) -> LlamaTokenizer:
    """A LLaMA-style SentencePiece BPE tokenizer trained on ``corpus``: digits split and byte fallback, as
    LLaMA's. Without byte fallback "\n" (after each image) has no piece and is dropped, and the character
    offsets of the tokens after it shift by one, which would unlabel the first answer's digit."""
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_prefix=str(folder / "tokenizer"), vocab_size=vocab_size,
        model_type="bpe", split_digits=True, byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        hard_vocab_limit=False, num_threads=1, minloglevel=2,
    )
    (folder / "tokenizer.vocab").unlink()
    tokenizer = LlamaTokenizer.from_pretrained(folder)  # reads tokenizer.model
    tokenizer.pad_token = "<pad>"
    tokenizer.chat_template = LLAVA_V1_CHAT_TEMPLATE
    return tokenizer


def quadrant_of_patches(grid: int) -> torch.Tensor:
    """``[grid * grid]``: the quadrant (0 top left .. 3 bottom right) of each patch, row-major."""
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return ((rows >= grid // 2).long() * 2 + (cols >= grid // 2).long()).flatten()


def pretrain_vision_tower(model: CLIPVisionModel, processor, data_dir: Path, sizes: BaseSizes) -> dict:
    """Stage 0: the mean of each quadrant's patch tokens (last layer) learns to name that quadrant's digit
    through a linear probe trained with the tower, on the train grids only; and the mean of all patch tokens
    of a clip frame (one large digit) names that digit, through a second probe. (A probe on every single patch
    token reached 57% on test patches in the same time, against 90% for quadrant means.) Returns the
    probe's accuracy on 200 held-out test grids."""
    labels = json.loads((data_dir / "labels.json").read_text())
    train_names = sorted(n for n in labels if n.startswith("images/train_"))[:sizes.vision_pretrain_images]
    test_names = sorted(n for n in labels if n.startswith("images/test_"))[:200]

    def load(names):
        pixels = processor([load_image(data_dir / n) for n in names], return_tensors="pt")["pixel_values"]
        return pixels, torch.tensor([labels[n]["digits"] for n in names])  # [n, 3, H, W], [n, 4]

    def load_frames(split, limit=None):
        folders = sorted(n for n in labels if n.startswith(f"clips/{split}_"))[:limit]
        paths = [(data_dir / f / f"{i:03d}.png", d) for f in folders for i, d in enumerate(labels[f]["digits"])]
        pixels = processor([load_image(p) for p, _ in paths], return_tensors="pt")["pixel_values"]
        return pixels, torch.tensor([d for _, d in paths])  # [frames, 3, H, W], [frames]

    train_pixels, train_digits = load(train_names)
    test_pixels, test_digits = load(test_names)
    train_frames, train_frame_digits = load_frames("train")
    test_frames, test_frame_digits = load_frames("test", limit=50)
    grid = sizes.image_size // sizes.patch_size
    quadrant_share = nn.functional.one_hot(quadrant_of_patches(grid)).float() / (grid * grid // 4)  # [N, 4]
    probe, frame_probe = nn.Linear(sizes.vision_hidden, 10), nn.Linear(sizes.vision_hidden, 10)
    token_probe = nn.Linear(sizes.vision_hidden, 10 * 4)  # every token: (its quadrant, that quadrant's digit)
    quadrant = quadrant_of_patches(grid)  # [N]
    probes = (probe, frame_probe, token_probe)
    parameters = list(model.parameters()) + [p for head in probes for p in head.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=2e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=sizes.vision_pretrain_steps)
    generator = torch.Generator().manual_seed(sizes.seed)

    def frame_logits(pixels):
        return frame_probe(model(pixel_values=pixels).last_hidden_state[:, 1:].mean(dim=1))  # [b, 10]

    def quadrant_logits(pixels):
        patch_features = model(pixel_values=pixels).last_hidden_state[:, 1:]  # [b, N, C], CLS dropped as LLaVA does
        quadrant_features = torch.einsum("bnc,nq->bqc", patch_features, quadrant_share)  # [b, 4, C]
        return probe(quadrant_features), token_probe(patch_features)  # [b, 4, 10], [b, N, 40]

    model.train()
    for _ in tqdm(range(sizes.vision_pretrain_steps), desc="stage 0: vision tower", unit="step"):
        rows = torch.randint(len(train_pixels), (sizes.vision_pretrain_batch,), generator=generator)
        logits, token_logits = quadrant_logits(train_pixels[rows])
        token_targets = quadrant * 10 + train_digits[rows][:, quadrant]  # [b, N]
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), train_digits[rows].flatten())
        loss = loss + nn.functional.cross_entropy(token_logits.flatten(0, 1), token_targets.flatten())
        if len(train_frames):
            frames = torch.randint(len(train_frames), (sizes.vision_pretrain_batch // 4,), generator=generator)
            loss = loss + nn.functional.cross_entropy(frame_logits(train_frames[frames]), train_frame_digits[frames])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    with torch.no_grad():
        quadrant_predictions, token_predictions = (logits.argmax(-1) for logits in quadrant_logits(test_pixels))
        predictions = quadrant_predictions  # [n, 4]
        token_accuracy = (token_predictions == quadrant * 10 + test_digits[:, quadrant]).float().mean().item()
        frame_predictions = frame_logits(test_frames).argmax(-1) if len(test_frames) else None
    accuracy = (predictions == test_digits).float().mean().item()
    frame_accuracy = (frame_predictions == test_frame_digits).float().mean().item() if len(test_frames) else None
    return {"quadrant_accuracy_test": round(accuracy, 4), "token_accuracy_test": round(token_accuracy, 4),
            "frame_accuracy_test": frame_accuracy,
            "final_loss": round(loss.item(), 4)}


def build_base(data_dir: str | Path, out: str | Path, sizes: BaseSizes | None = None) -> dict:
    """Writes the base models under ``out``; returns a summary (also ``out/base.json``)."""
    sizes = sizes or BaseSizes()
    data_dir, out = Path(data_dir), Path(out)
    started = time.perf_counter()
    torch.manual_seed(sizes.seed)
    corpus = corpus_from_data(data_dir)

    tokenizer = train_sentencepiece_tokenizer(corpus, out / "llm", sizes.vocab_size)
    llm_config = LlamaConfig(
        hidden_size=sizes.text_hidden, intermediate_size=2 * sizes.text_hidden,
        num_hidden_layers=sizes.text_layers, num_attention_heads=sizes.text_heads,
        num_key_value_heads=sizes.text_heads, vocab_size=len(tokenizer), max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(llm_config).save_pretrained(out / "llm")
    tokenizer.save_pretrained(out / "llm")

    vision_config = CLIPVisionConfig(
        hidden_size=sizes.vision_hidden, intermediate_size=2 * sizes.vision_hidden,
        num_hidden_layers=sizes.vision_layers, num_attention_heads=sizes.vision_heads,
        image_size=sizes.image_size, patch_size=sizes.patch_size, projection_dim=sizes.vision_hidden,
    )
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": sizes.image_size}, crop_size={"height": sizes.image_size, "width": sizes.image_size},
    )
    vision_tower = CLIPVisionModel(vision_config)
    stage0 = pretrain_vision_tower(vision_tower, image_processor, data_dir, sizes)
    vision_tower.save_pretrained(out / "vision_tower")
    image_processor.save_pretrained(out / "vision_tower")

    train_wordpiece_tokenizer(corpus, vocab_size=200).save_pretrained(out / "text_decoder_tokenizer")
    qformer = {"hidden_size": sizes.qformer_hidden, "num_hidden_layers": sizes.qformer_layers,
               "num_attention_heads": 4, "intermediate_size": 2 * sizes.qformer_hidden,
               "max_position_embeddings": 256}
    (out / "text_decoder.json").write_text(json.dumps(qformer, indent=1))

    summary = {"sizes": asdict(sizes), "stage0": stage0, "tokenizer_size": len(tokenizer),
               "llm_parameters": sum(p.numel() for p in LlamaForCausalLM(llm_config).parameters()),
               "vision_parameters": sum(p.numel() for p in vision_tower.parameters()),
               "seconds": round(time.perf_counter() - started, 1)}
    (out / "base.json").write_text(json.dumps(summary, indent=1))
    return summary


__all__ = ["BaseSizes", "build_base", "pretrain_vision_tower", "train_sentencepiece_tokenizer"]
