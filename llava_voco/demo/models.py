"""The DigitGrid demo's tiny base models, in the layouts the train entry reads (set-up (a)).

    base/llm/            a LlamaForCausalLM through its text stage (``pretrain_llm``) with a SentencePiece tokenizer
                         trained on the data's text
    base/vision_tower/   a CLIPVisionModel pretrained here ("stage 0") and its CLIP image processor
    base/text_decoder_tokenizer/, base/text_decoder.json   LLaMA-VID's BERT WordPiece tokenizer and Q-Former size

Nothing pretrained can be downloaded here, and docs/design.md §5 found that a LLaVA whose vision tower starts from
random weights stays at chance for a long time. Real LLaVA starts from a pretrained CLIP; so does this
demo, from a tiny one pretrained for a few seconds on the *train* grids to name the digit of each
quadrant from the patch tokens (``pretrain_vision_tower``). Test images are never seen. Real LLaVA also
starts from an LLM that already reads; this one is first trained to answer the questions about grids
written in digit tokens (``pretrain_llm``).
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
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
from . import digitgrid
from .tiny import LLAVA_V1_CHAT_TEMPLATE, train_wordpiece_tokenizer
from ..image_io import load_image


@dataclass
class BaseSizes:
    """Sizes of the demo's models (docs/design.md §5's calibration model: ViT 3 x 96, patch 4 on 32 px, Llama 4 x 128)."""

    image_size: int = 32
    patch_size: int = 8  # 16 vision tokens per image (4 per digit): VoCo's one token is a 16x compression
    vision_hidden: int = 96
    vision_layers: int = 3
    vision_heads: int = 4
    text_hidden: int = 128
    text_layers: int = 4
    text_heads: int = 4
    vocab_size: int = 512  # 256 of them byte-fallback pieces
    qformer_hidden: int = 64  # LLaMA-VID's text decoder
    qformer_layers: int = 2
    vision_pretrain_steps: int = 300
    vision_pretrain_images: int = 4000  # the first train grids (stage 0 sees 300 x 64 of them)
    vision_pretrain_batch: int = 64
    llm_pretrain_steps: int = 2000  # the LLM's text stage (``pretrain_llm``)
    llm_pretrain_batch: int = 32
    llm_pretrain_lr: float = 1e-3
    seed: int = 0


# The chat template the demo trains and evaluates with (``--version`` / ``--conv-mode``): "[INST] <image>\n
# question [/INST] answer </s>", no system prompt, so a sample is ~40 tokens and most of them are the image's.
CONV_MODE = "mistral_instruct"


def corpus_from_data(data_dir: Path) -> list[str]:
    """Every line of text the model will read: the conversations of train.json in the demo's template."""
    samples = json.loads((data_dir / "train.json").read_text())
    template = get_template(CONV_MODE)
    lines = [template.system] if template.system else []
    for sample in samples:
        turns = sample["conversations"]
        for question, answer in zip(turns[0::2], turns[1::2]):
            text = question["value"].replace("<image>", "").replace("<video>", "").strip()
            lines.append(f"[INST] {text} [/INST] {answer['value']}")
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
    """Stage 0, on the train grids and clips only. The tower learns *what* each quadrant shows and *where*
    each patch is, separately: one linear probe, shared by the four quadrants, names a quadrant's digit from
    the mean of its patch tokens; a second names each patch token's quadrant; a third names a clip frame's
    digit from the mean of its patches. Nothing asks for the pair (quadrant, digit) from one token, so the
    tower is not pushed to a code where the mean of all tokens keeps which digit is where (a joint
    40-class probe on every token did that here until 2026-12-06, and mean pooling then loses less than it
    does with a real CLIP). Returns the probes' accuracies on held-out test grids."""
    labels = json.loads((data_dir / "labels.json").read_text())
    train_names = sorted(n for n in labels if n.startswith("images/train_"))[:sizes.vision_pretrain_images]
    test_names = sorted(n for n in labels if n.startswith("images/test_"))[:200]

    def load(names):
        pixels = processor([load_image(data_dir / n) for n in names], return_tensors="pt")["pixel_values"]
        return pixels, torch.tensor([labels[n]["digits"] for n in names])  # [n, 3, H, W], [n, 4]

    def load_frames(split, limit=None):
        folders = sorted(n for n in labels if n.startswith(f"clips/{split}_"))[:limit]
        paths = [(data_dir / f / f"{i:03d}.png", d) for f in folders for i, d in enumerate(labels[f]["digits"])]
        if not paths:
            return torch.zeros(0), torch.zeros(0, dtype=torch.long)
        pixels = processor([load_image(p) for p, _ in paths], return_tensors="pt")["pixel_values"]
        return pixels, torch.tensor([d for _, d in paths])  # [frames, 3, H, W], [frames]

    train_pixels, train_digits = load(train_names)
    test_pixels, test_digits = load(test_names)
    train_frames, train_frame_digits = load_frames("train", limit=1000)
    test_frames, test_frame_digits = load_frames("test", limit=50)
    grid = sizes.image_size // sizes.patch_size
    quadrant = quadrant_of_patches(grid)  # [N]
    quadrant_share = nn.functional.one_hot(quadrant).float() / (grid * grid // 4)  # [N, 4]
    what_probe, where_probe = nn.Linear(sizes.vision_hidden, 10), nn.Linear(sizes.vision_hidden, 4)
    frame_probe = nn.Linear(sizes.vision_hidden, 10)
    probes = (what_probe, where_probe, frame_probe)
    parameters = list(model.parameters()) + [p for head in probes for p in head.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=2e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=sizes.vision_pretrain_steps)
    generator = torch.Generator().manual_seed(sizes.seed)

    def patches(pixels):
        return model(pixel_values=pixels).last_hidden_state[:, 1:]  # [b, N, C], CLS dropped as LLaVA does

    def grid_logits(pixels):
        patch_features = patches(pixels)
        quadrant_features = torch.einsum("bnc,nq->bqc", patch_features, quadrant_share)  # [b, 4, C]
        return what_probe(quadrant_features), where_probe(patch_features)  # [b, 4, 10], [b, N, 4]

    model.train()
    for _ in tqdm(range(sizes.vision_pretrain_steps), desc="stage 0: vision tower", unit="step"):
        rows = torch.randint(len(train_pixels), (sizes.vision_pretrain_batch,), generator=generator)
        what, where = grid_logits(train_pixels[rows])
        loss = nn.functional.cross_entropy(what.flatten(0, 1), train_digits[rows].flatten())
        loss = loss + nn.functional.cross_entropy(where.flatten(0, 1), quadrant.repeat(len(rows)))
        if len(train_frames):
            frames = torch.randint(len(train_frames), (sizes.vision_pretrain_batch // 4,), generator=generator)
            frame_logits = frame_probe(patches(train_frames[frames]).mean(dim=1))
            loss = loss + nn.functional.cross_entropy(frame_logits, train_frame_digits[frames])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    with torch.no_grad():
        what, where = grid_logits(test_pixels)
        summary = {"quadrant_accuracy_test": (what.argmax(-1) == test_digits).float().mean().item(),
                   "patch_quadrant_accuracy_test": (where.argmax(-1) == quadrant).float().mean().item()}
        if len(test_frames):
            frame_logits = frame_probe(patches(test_frames).mean(dim=1))
            summary["frame_accuracy_test"] = (frame_logits.argmax(-1) == test_frame_digits).float().mean().item()
    summary = {key: round(value, 4) for key, value in summary.items()}
    summary["final_loss"] = round(loss.item(), 4)
    summary["linear_probes"] = probe_frozen_features(model, train_pixels[:600], train_digits[:600], test_pixels,
                                                     test_digits, quadrant)
    return summary


def probe_frozen_features(model: CLIPVisionModel, train_pixels, train_digits, test_pixels, test_digits,
                          quadrant: torch.Tensor) -> dict:
    """What the finished tower's patch tokens hold, read by linear probes fitted afresh (scikit-learn) on train
    grids and scored on test grids: each patch's quadrant and its quadrant's digit, from the token alone;
    and, from the mean of all of an image's tokens (what ``pool1`` reads), the digit at the top left (the
    layout) and whether each digit is present (the content)."""
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    with torch.no_grad():
        train_features = model(pixel_values=train_pixels).last_hidden_state[:, 1:].numpy()  # [n, N, C]
        test_features = model(pixel_values=test_pixels).last_hidden_state[:, 1:].numpy()
    train_digits, test_digits = train_digits.numpy(), test_digits.numpy()
    n_patches = train_features.shape[1]

    def fit(train_x, train_y, test_x, test_y):
        with threadpool_limits(1):  # one thread, as the rest of the run: threads fight on a shared machine
            probe = LogisticRegression(max_iter=300).fit(train_x, train_y)
            return round(float(probe.score(test_x, test_y)), 4)

    quadrant = quadrant.numpy()
    patch_digit_train = train_digits[:, quadrant].reshape(-1)  # each patch's quadrant's digit
    patch_digit_test = test_digits[:, quadrant].reshape(-1)
    flat_train, flat_test = train_features.reshape(-1, train_features.shape[-1]), test_features.reshape(-1, test_features.shape[-1])
    mean_train, mean_test = train_features.mean(axis=1), test_features.mean(axis=1)
    presence = [fit(mean_train, (train_digits == d).any(1), mean_test, (test_digits == d).any(1)) for d in range(10)]
    return {
        "patch_to_its_quadrant": fit(flat_train, np.tile(quadrant, len(train_features)), flat_test,
                                     np.tile(quadrant, len(test_features))),
        "patch_to_its_quadrants_digit": fit(flat_train, patch_digit_train, flat_test, patch_digit_test),
        "mean_of_patches_to_top_left_digit": fit(mean_train, train_digits[:, 0], mean_test, test_digits[:, 0]),
        "mean_of_patches_to_presence": round(float(np.mean(presence)), 4),
        "patches_per_image": n_patches,
    }


class TextGrids:
    """DigitGrid conversations whose image is written in words: each of an image's patch tokens is the digit
    token of its quadrant's digit (a clip's frame: 16 tokens of its digit), at the place the image's tokens
    take, in the data's own template and answer format (the kind a grid was drawn for, one more kind, the
    caption). Fresh random digits every sample; no digit image is read."""

    def __init__(self, tokenizer, grid: int, frames: int, seed: int):
        self.tokenizer = copy.deepcopy(tokenizer)  # with an <image> piece to render through; the saved one has none
        self.tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
        self.image_token_id = self.tokenizer.convert_tokens_to_ids("<image>")
        self.digit_ids = [tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]
        if tokenizer.unk_token_id in self.digit_ids:
            raise ValueError("the demo tokenizer has no piece for every digit 0-9 (split_digits must be on)")
        self.quadrant = quadrant_of_patches(grid).tolist()  # [N], N = grid * grid patch tokens
        self.frames, self.template = frames, get_template(CONV_MODE)
        self.rng = np.random.default_rng(seed)

    def sample(self, clip: bool) -> tuple[list[int], list[int], str]:
        """(input ids, labels with -100 outside the replies, the first question's kind)."""
        kinds = digitgrid.CLIP_KINDS if clip else digitgrid.IMAGE_KINDS
        kind = kinds[int(self.rng.integers(len(kinds)))]
        digits, question, answer = (digitgrid.clip_question(kind, self.frames, self.rng) if clip
                                    else digitgrid.grid_question(kind, self.rng))
        asked = digitgrid.training_questions(kinds, kind, digits, (question, answer), 2, self.rng, clip, with_caption=True)
        placeholder = "<image>" * (self.frames if clip else 1)
        turns = []
        for index, (text, reply) in enumerate(asked):
            turns += [("human", (f"{placeholder}\n" if index == 0 else "") + text), ("gpt", reply)]
        rendered = self.template.render(turns)
        encoded = self.tokenizer(rendered.text, return_offsets_mapping=True)
        ids, labels, image = [], [], 0
        for token, (start, end) in zip(encoded["input_ids"], encoded["offset_mapping"]):
            if token == self.image_token_id:
                shown = [digits[image]] * len(self.quadrant) if clip else [digits[q] for q in self.quadrant]
                ids += [self.digit_ids[d] for d in shown]
                labels += [-100] * len(shown)
                image += 1
                continue
            learned = any(end > span_start and start < span_end for span_start, span_end in rendered.target_spans)
            ids.append(token)
            labels.append(token if learned else -100)
        return ids, labels, kind

    def batch(self, size: int, pad_id: int) -> dict:
        """``size`` samples, a quarter of them clips, right-padded: input_ids, attention_mask, labels [size, L]."""
        samples = [self.sample(clip=index % 4 == 3) for index in range(size)]
        length = max(len(ids) for ids, _, _ in samples)
        input_ids = torch.full((size, length), pad_id)
        labels = torch.full((size, length), -100)
        attention_mask = torch.zeros(size, length, dtype=torch.long)
        for row, (ids, row_labels, _) in enumerate(samples):
            input_ids[row, :len(ids)], labels[row, :len(ids)] = torch.tensor(ids), torch.tensor(row_labels)
            attention_mask[row, :len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def pretrain_llm(model: LlamaForCausalLM, tokenizer, sizes: BaseSizes, frames: int) -> dict:
    """The LLM's text stage. Real LLaVA starts from an LLM that already reads and reasons in words (Vicuna);
    this one is trained, before any image is seen, to answer every DigitGrid question about grids written
    in digit tokens (``TextGrids``). What ``full`` then has to learn is to see: to turn each patch into the
    digit word it shows. Without this stage the demo's 4-layer LLM, learning the questions and the images
    at once, stayed at the text prior on presence, count and where for 1,200 steps, and learned them on
    text alone only after ~1,500 steps (docs/experiments/digitgrid-2026-12-06.md), which no row's budget
    allows; every method starts from this one LLM, as every method in the VoCo paper starts from the same
    one. Returns its teacher-forced accuracy per kind on fresh text grids (the first question of each)."""
    grids = TextGrids(tokenizer, sizes.image_size // sizes.patch_size, frames, seed=sizes.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=sizes.llm_pretrain_lr, weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=sizes.llm_pretrain_lr,
                                                   total_steps=sizes.llm_pretrain_steps, pct_start=0.05)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)  # nothing else runs during a base build: every core for it
    for _ in tqdm(range(sizes.llm_pretrain_steps), desc="LLM text stage", unit="step"):
        loss = model(**grids.batch(sizes.llm_pretrain_batch, tokenizer.pad_token_id)).loss
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    torch.set_num_threads(threads)
    model.eval()
    right: dict[str, list[bool]] = {}
    with torch.no_grad():
        for index in range(240):
            clip = index % 3 == 2
            ids, labels, kind = grids.sample(clip)
            first = [i for i, label in enumerate(labels) if label != -100]
            span = [first[0]]
            for position in first[1:]:
                if position != span[-1] + 1:
                    break
                span.append(position)
            logits = model(torch.tensor([ids[:span[-1] + 1]])).logits[0]  # [L, vocab]
            right.setdefault(("clip " if clip else "") + kind, []).append(
                all(int(logits[i - 1].argmax()) == ids[i] for i in span))
    return {"final_loss": round(loss.item(), 4),
            "accuracy_on_text_grids": {kind: round(float(np.mean(v)), 3) for kind, v in sorted(right.items())}}


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
    llm = LlamaForCausalLM(llm_config)
    frames = json.loads((data_dir / "split.json").read_text())["frames_per_clip"]
    text_stage = pretrain_llm(llm, tokenizer, sizes, frames)
    llm.save_pretrained(out / "llm")
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

    summary = {"sizes": asdict(sizes), "stage0": stage0, "llm_text_stage": text_stage, "tokenizer_size": len(tokenizer),
               "llm_parameters": sum(p.numel() for p in LlamaForCausalLM(llm_config).parameters()),
               "vision_parameters": sum(p.numel() for p in vision_tower.parameters()),
               "seconds": round(time.perf_counter() - started, 1)}
    (out / "base.json").write_text(json.dumps(summary, indent=1))
    return summary


__all__ = ["CONV_MODE", "BaseSizes", "build_base", "pretrain_vision_tower", "train_sentencepiece_tokenizer"]
