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
    vision_pretrain_steps: int = 3000  # 94% of test digits read at 300 steps, 98.7% at 3,000 (with the jitter)
    vision_pretrain_batch: int = 64  # grids drawn afresh each step, and a quarter as many clip frames
    vision_pretrain_jitter: int = 1  # pixels a digit may move in its 16 x 16 cell in stage 0's pictures
    llm_pretrain_steps: int = 1200  # the LLM's text stage (``pretrain_llm``): 100% on every kind of text grid by then
    llm_pretrain_batch: int = 32
    llm_pretrain_lr: float = 1e-3
    # The LLM's initial weights' std. Llama's 0.02 suits 4,096-wide layers; at 128 wide it leaves q.k near zero,
    # and the look-up of a digit named in the question stayed at the prior for ~1,500 text-stage steps; at 0.08
    # (about 1 / sqrt(128)) it was learned by step 500 (docs/experiments/digitgrid-2026-12-07.md)
    llm_init_std: float = 0.08
    llm_pretrain_turns: int = 2  # questions per text-stage sample, before the caption
    seed: int = 0


# The chat template the demo trains and evaluates with (``--version`` / ``--conv-mode``): "[INST] <image>\n
# question [/INST] answer </s>", no system prompt, so a sample is ~40 tokens and most of them are the image's.
CONV_MODE = "mistral_instruct"


def corpus_from_data(data_dir: Path) -> list[str]:
    """Every line of text the model will read: the conversations of train.json in the demo's template."""
    samples = json.loads((data_dir / "train.json").read_text())
    template = get_template(CONV_MODE)
    opening, closing = template.turn_markers()
    lines = [template.system] if template.system else []
    for sample in samples:
        turns = sample["conversations"]
        for question, answer in zip(turns[0::2], turns[1::2]):
            text = question["value"].replace("<image>", "").replace("<video>", "").strip()
            lines.append(f"{opening} {text} {closing} {answer['value']}")
    return lines


def train_sentencepiece_tokenizer(corpus: list[str], folder: Path, vocab_size: int) -> LlamaTokenizer:
    """A LLaMA-style SentencePiece BPE tokenizer trained on ``corpus``: digits split and byte fallback, as
    LLaMA's. Without byte fallback "\n" (after each image) has no piece and is dropped, and the character
    offsets of the tokens after it shift by one, which would unlabel the first answer's digit. The template's
    turn markers are single pieces, as in Mistral's later tokenizers: split, "[INST]" and "[/INST]" were three
    pieces each, a quarter of a train sample's tokens (before each row's stage 1, the shorter samples cost
    ``full`` its bottom row's left and right on 2 training seeds of 3: docs/experiments/digitgrid-2026-12-07.md)."""
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_prefix=str(folder / "tokenizer"), vocab_size=vocab_size,
        model_type="bpe", split_digits=True, byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        hard_vocab_limit=False, num_threads=1, minloglevel=2,
        user_defined_symbols=list(get_template(CONV_MODE).turn_markers()),
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


class DigitCells:
    """Stage 0's pictures, drawn afresh every step from the split's digit images: grids of four digits and
    clip frames, composed in pixel-value space exactly as ``digitgrid`` renders them and normalised as the
    tower's image processor does. In training each digit may move by a pixel in its cell (the handwriting's
    own jitter): with 1,347 train digits a tower trained on fixed grids read 94% of test digits, and with the
    moves 98.7% (docs/experiments/digitgrid-2026-12-07.md)."""

    def __init__(self, data_dir: Path, processor, split: str, seed: int):
        settings = json.loads((data_dir / "split.json").read_text())
        pixels, targets, _, _ = digitgrid.load_digits_split(settings["seed"])
        indices = settings[f"{split}_digit_indices"]
        self.cells = torch.tensor(np.stack([digitgrid.digit_cell(pixels[i]) for i in indices]),
                                  dtype=torch.float32) / 255.0  # [n, 16, 16], as rendered
        self.digits = torch.tensor(targets[indices])  # [n]
        self.mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)
        self.std = torch.tensor(processor.image_std).view(1, 3, 1, 1)
        self.generator = torch.Generator().manual_seed(seed)

    def _cells(self, rows: torch.Tensor, jitter: int) -> torch.Tensor:
        cells = self.cells[rows]  # [..., 16, 16]
        if not jitter:
            return cells
        flat = cells.reshape(-1, *cells.shape[-2:])
        shifts = torch.randint(-jitter, jitter + 1, (len(flat), 2), generator=self.generator)
        padded = nn.functional.pad(flat, (jitter,) * 4)
        size = flat.shape[-1]
        moved = torch.stack([p[jitter - dy:jitter - dy + size, jitter - dx:jitter - dx + size]
                             for p, (dy, dx) in zip(padded, shifts.tolist())])
        return moved.reshape(cells.shape)

    def _normalise(self, gray: torch.Tensor) -> torch.Tensor:
        return (gray[:, None].expand(-1, 3, -1, -1) - self.mean) / self.std  # [b, 3, H, W]

    def grids(self, count: int, jitter: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``count`` grids of four random digits: pixel values [count, 3, 32, 32], digits [count, 4] in reading order."""
        rows = torch.randint(len(self.cells), (count, 4), generator=self.generator)
        cells = self._cells(rows, jitter)  # [count, 4, 16, 16]
        gray = torch.cat([torch.cat([cells[:, 0], cells[:, 1]], -1), torch.cat([cells[:, 2], cells[:, 3]], -1)], -2)
        return self._normalise(gray), self.digits[rows]

    def frames(self, count: int, jitter: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``count`` clip frames (one digit upscaled to the whole picture): [count, 3, 32, 32], digits [count]."""
        rows = torch.randint(len(self.cells), (count,), generator=self.generator)
        cells = self._cells(rows, jitter)
        return self._normalise(torch.kron(cells, torch.ones(2, 2))), self.digits[rows]


def pretrain_vision_tower(model: CLIPVisionModel, processor, data_dir: Path, sizes: BaseSizes) -> dict:
    """Stage 0, on the train digits only. The tower learns *what* each quadrant shows and *where*
    each patch is, separately: one linear probe, shared by every patch, names the digit of the patch's
    quadrant; a second names each patch token's quadrant; a third names a clip frame's digit from each of its
    patches. Every token knows its digit, so the LLM can find "the 7" by its tokens (with the digit read only
    from a quadrant's mean, `full` learned where a digit is on one seed of two: 57% and 19%). Nothing asks for
    the pair (quadrant, digit) from one token, so the
    tower is not pushed to a code where the mean of all tokens keeps which digit is where (a joint
    40-class probe on every token did that here until 2026-12-06, and mean pooling then loses less than it
    does with a real CLIP). Every ``full`` answer about all four cells needs all four digits read, so the
    tower trains until it reads ~98% of test digits (``DigitCells``). Returns the probes' accuracies on
    held-out test grids."""
    train, test = (DigitCells(data_dir, processor, split, seed=sizes.seed) for split in ("train", "test"))
    grid = sizes.image_size // sizes.patch_size
    quadrant = quadrant_of_patches(grid)  # [N]
    quadrant_share = nn.functional.one_hot(quadrant).float() / (grid * grid // 4)  # [N, 4]
    what_probe, where_probe = nn.Linear(sizes.vision_hidden, 10), nn.Linear(sizes.vision_hidden, 4)
    frame_probe = nn.Linear(sizes.vision_hidden, 10)
    probes = (what_probe, where_probe, frame_probe)
    parameters = list(model.parameters()) + [p for head in probes for p in head.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=2e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=sizes.vision_pretrain_steps)

    def patches(pixels):
        return model(pixel_values=pixels).last_hidden_state[:, 1:]  # [b, N, C], CLS dropped as LLaVA does

    def grid_logits(pixels):
        patch_features = patches(pixels)
        return what_probe(patch_features), where_probe(patch_features)  # [b, N, 10], [b, N, 4]

    batch = sizes.vision_pretrain_batch
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)  # as the text stage: 42 steps/s on 2 cores against 28 on one
    for _ in tqdm(range(sizes.vision_pretrain_steps), desc="stage 0: vision tower", unit="step"):
        pixels, digits = train.grids(batch, jitter=sizes.vision_pretrain_jitter)
        what, where = grid_logits(pixels)
        loss = nn.functional.cross_entropy(what.flatten(0, 1), digits[:, quadrant].flatten())
        loss = loss + nn.functional.cross_entropy(where.flatten(0, 1), quadrant.repeat(batch))
        frames, frame_digits = train.frames(batch // 4, jitter=sizes.vision_pretrain_jitter)
        frame_logits = frame_probe(patches(frames))  # [b / 4, N, 10]: every patch names its frame's digit
        loss = loss + nn.functional.cross_entropy(frame_logits.flatten(0, 1), frame_digits.repeat_interleave(frame_logits.shape[1]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    torch.set_num_threads(threads)
    model.eval()
    test_pixels, test_digits = test.grids(1000)
    test_frames, test_frame_digits = test.frames(1000)
    with torch.no_grad():
        what, where = grid_logits(test_pixels)
        quadrant_logits = torch.einsum("bnk,nq->bqk", what, quadrant_share)  # [b, 4, 10]: a quadrant's patches' mean
        read = quadrant_logits.argmax(-1) == test_digits  # [1000, 4]
        summary = {"quadrant_accuracy_test": read.float().mean().item(),
                   "all_four_read_test": read.all(-1).float().mean().item(),
                   "patch_digit_accuracy_test": (what.argmax(-1) == test_digits[:, quadrant]).float().mean().item(),
                   "patch_quadrant_accuracy_test": (where.argmax(-1) == quadrant).float().mean().item(),
                   "frame_accuracy_test": (frame_probe(patches(test_frames).mean(dim=1)).argmax(-1)
                                           == test_frame_digits).float().mean().item()}
    summary = {key: round(value, 4) for key, value in summary.items()}
    summary["final_loss"] = round(loss.item(), 4)
    train_pixels, train_digits = train.grids(600)
    summary["linear_probes"] = probe_frozen_features(model, train_pixels, train_digits, test_pixels[:200],
                                                     test_digits[:200], quadrant)
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
    """DigitGrid conversations whose image is written in words, at the place the image's tokens take, in the
    data's own template and answer format (the kind a grid was drawn for, ``turns - 1`` more kinds, the
    caption). Each of a grid's patch tokens is its quadrant's digit token plus, as ``places``, its quadrant's
    words ("top" + "left"): what a CLIP patch feature holds, what it shows and where (its position
    embedding), which the demo's tower also learns (stage 0's where probe reads every patch's quadrant). A clip
    frame's 16 tokens are its digit's, with no place: the tower sees one frame at a time, so when is known
    only from the order. Fresh random digits every sample; no digit image is read."""

    def __init__(self, tokenizer, grid: int, frames: int, seed: int, turns: int = 2):
        self.tokenizer = copy.deepcopy(tokenizer)  # with an <image> piece to render through; the saved one has none
        self.tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
        self.image_token_id = self.tokenizer.convert_tokens_to_ids("<image>")
        self.digit_ids = [tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]
        if tokenizer.unk_token_id in self.digit_ids:
            raise ValueError("the demo tokenizer has no piece for every digit 0-9 (split_digits must be on)")
        self.place_ids = [tokenizer(position, add_special_tokens=False)["input_ids"] for position in digitgrid.POSITIONS]
        self.quadrant = quadrant_of_patches(grid).tolist()  # [N], N = grid * grid patch tokens
        self.frames, self.turns, self.template = frames, turns, get_template(CONV_MODE)
        self.rng = np.random.default_rng(seed)

    def sample(self, clip: bool) -> tuple[list[int], list[int], list[int], str]:
        """(input ids, labels with -100 outside the replies, each token's place: its quadrant 0-3 for a grid's
        tokens and -1 elsewhere, the first question's kind)."""
        kinds = digitgrid.CLIP_KINDS if clip else digitgrid.IMAGE_KINDS
        kind = kinds[int(self.rng.integers(len(kinds)))]
        digits, question, answer = (digitgrid.clip_question(kind, self.frames, self.rng) if clip
                                    else digitgrid.grid_question(kind, self.rng))
        asked = digitgrid.training_questions(kinds, kind, digits, (question, answer), self.turns, self.rng, clip,
                                             with_caption=True)
        placeholder = "<image>" * (self.frames if clip else 1)
        turns = []
        for index, (text, reply) in enumerate(asked):
            turns += [("human", (f"{placeholder}\n" if index == 0 else "") + text), ("gpt", reply)]
        rendered = self.template.render(turns)
        encoded = self.tokenizer(rendered.text, return_offsets_mapping=True)
        ids, labels, places, image = [], [], [], 0
        for token, (start, end) in zip(encoded["input_ids"], encoded["offset_mapping"]):
            if token == self.image_token_id:
                shown = [digits[image]] * len(self.quadrant) if clip else [digits[q] for q in self.quadrant]
                ids += [self.digit_ids[d] for d in shown]
                labels += [-100] * len(shown)
                places += [-1] * len(shown) if clip else self.quadrant
                image += 1
                continue
            learned = any(end > span_start and start < span_end for span_start, span_end in rendered.target_spans)
            ids.append(token)
            labels.append(token if learned else -100)
            places.append(-1)
        return ids, labels, places, kind

    def batch(self, size: int, pad_id: int, clip_share: float = 0.5) -> dict:
        """``size`` samples, ``clip_share`` of them clips, right-padded: input_ids, attention_mask, labels and
        places [size, L]."""
        clips = round(size * clip_share)
        samples = [self.sample(clip=index < clips) for index in range(size)]
        length = max(len(ids) for ids, _, _, _ in samples)
        batch = {"input_ids": torch.full((size, length), pad_id), "attention_mask": torch.zeros(size, length, dtype=torch.long),
                 "labels": torch.full((size, length), -100), "places": torch.full((size, length), -1)}
        for row, (ids, labels, places, _) in enumerate(samples):
            batch["input_ids"][row, :len(ids)], batch["labels"][row, :len(ids)] = torch.tensor(ids), torch.tensor(labels)
            batch["places"][row, :len(ids)] = torch.tensor(places)
            batch["attention_mask"][row, :len(ids)] = 1
        return batch

    def embed(self, model: LlamaForCausalLM, input_ids: torch.Tensor, places: torch.Tensor) -> torch.Tensor:
        """The LLM's input embeddings [b, L, C]: each token's, plus its quadrant's words' where it has a place."""
        embeddings = model.get_input_embeddings()
        place_vectors = torch.stack([embeddings.weight[ids].sum(0) for ids in self.place_ids])  # [4, C]
        with_place = torch.cat([torch.zeros_like(place_vectors[:1]), place_vectors])  # row 0: no place
        return embeddings(input_ids) + with_place[places + 1]


def pretrain_llm(model: LlamaForCausalLM, tokenizer, sizes: BaseSizes, frames: int) -> dict:
    """The LLM's text stage. Real LLaVA starts from an LLM that already reads and reasons in words (Vicuna);
    this one is trained, before any image is seen, to answer every DigitGrid question about grids written
    in words (``TextGrids``). What ``full`` then has to learn is to see: to turn each patch into the digit
    and the place it shows. Without this stage the demo's 4-layer LLM, learning the questions and the images
    at once, stayed at the text prior on presence, count and where for 1,200 steps, which no row's budget
    can change. On text alone the look-ups by digit (presence, count, where) are learned in a jump: after
    ~1,500 steps from Llama's initial scale, by step 500-1,000 from ``llm_init_std``
    (docs/experiments/digitgrid-2026-12-07.md). Every method starts from this one LLM, as every
    method in the VoCo paper starts from the same one. Returns its teacher-forced accuracy per kind on fresh
    text grids (the first question of each)."""
    grids = TextGrids(tokenizer, sizes.image_size // sizes.patch_size, frames, seed=sizes.seed,
                      turns=sizes.llm_pretrain_turns)
    optimizer = torch.optim.AdamW(model.parameters(), lr=sizes.llm_pretrain_lr, weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=sizes.llm_pretrain_lr,
                                                   total_steps=sizes.llm_pretrain_steps, pct_start=0.05)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)  # nothing else runs during a base build: every core for it
    for _ in tqdm(range(sizes.llm_pretrain_steps), desc="LLM text stage", unit="step"):
        batch = grids.batch(sizes.llm_pretrain_batch, tokenizer.pad_token_id)
        loss = model(inputs_embeds=grids.embed(model, batch["input_ids"], batch["places"]),
                     attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
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
            ids, labels, places, kind = grids.sample(clip)
            first = [i for i, label in enumerate(labels) if label != -100]
            span = [first[0]]
            for position in first[1:]:
                if position != span[-1] + 1:
                    break
                span.append(position)
            end = span[-1] + 1
            embedded = grids.embed(model, torch.tensor([ids[:end]]), torch.tensor([places[:end]]))
            logits = model(inputs_embeds=embedded).logits[0]  # [L, vocab]
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
        tie_word_embeddings=False, initializer_range=sizes.llm_init_std,
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
