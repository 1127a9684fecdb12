"""The DigitGrid builder: disjoint splits, answers that follow from the labels, images that show them."""

import json
import os
import re
from dataclasses import replace
import subprocess
import sys
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

from llava_voco.demo.digitgrid import CELL, CLIP_KINDS, IMAGE_KINDS, POSITIONS, build, digit_cell
from llava_voco.image_io import load_image
from llava_voco.train.data import load_samples


# Each DigitGrid question: its category, its text as a pattern, and its answer from the digits (reading order /
# frame order), written here independently of the builder.
QUESTIONS = (
    ("presence", r"Is there a (\d) in the clip\?", lambda digits, d: d + (" yes" if int(d) in digits else " no")),
    ("count", r"How many frames show a (\d)\?", lambda digits, d: f"{d} " + ["none", "once", "twice"][digits.count(int(d))]),
    ("frame", r"Which digit is in frame (\d)\?", lambda digits, i: f"frame {i} {digits[int(i) - 1]}"),
    ("presence", r"Is there a (\d)\?", lambda digits, d: d + (" yes" if int(d) in digits else " no")),
    ("count", r"How many (\d)s are there\?", lambda digits, d: f"{d} " + ["none", "once", "twice"][digits.count(int(d))]),
    ("largest", r"What is the largest digit\?", lambda digits: str(max(digits))),
    ("where", r"Where is the (\d)\?", lambda digits, d: f"{d} {POSITIONS[digits.index(int(d))]}"),
    ("position", r"Which digit is at the (top left|top right|bottom left|bottom right)\?",
     lambda digits, p: f"{p} {digits[POSITIONS.index(p)]}"),
    ("caption", r"What digits are (?:shown|in the clip)\?", lambda digits: " ".join(map(str, digits))),
)


def expected_answer(text: str, digits: list[int]) -> tuple[str, str]:
    """(category, answer) of a DigitGrid question, worked out here from the digits' scikit-learn labels."""
    for category, pattern, answer in QUESTIONS:
        match = re.fullmatch(pattern, text)
        if match:
            return category, answer(digits, *match.groups())
    raise AssertionError(f"not a DigitGrid question: {text!r}")


def category_of(text: str) -> str:
    return next(category for category, pattern, _ in QUESTIONS if re.fullmatch(pattern, text))


def test_build(tmp_path):
    summary = build(tmp_path, train_images=60, test_images=30, train_clips=15, test_clips=9, frames=3, seed=3, turns=3,
                    caption=True)
    train, test = set(summary["train_digit_indices"]), set(summary["test_digit_indices"])
    assert not train & test and len(train | test) == 1797
    digits = load_digits()
    for label in range(10):  # stratified: a quarter of each digit's images is test
        of_label = np.flatnonzero(digits.target == label)
        assert abs(np.isin(of_label, list(test)).mean() - 0.25) < 0.01
    labels = json.loads((tmp_path / "labels.json").read_text())

    seen = {"image": set(), "clip": set()}
    for split, pool in (("train", train), ("test", test)):
        samples = json.loads((tmp_path / f"{split}.json").read_text())
        assert len(samples) == summary[f"{split}_samples"]
        for sample in samples:
            media = sample.get("image") or sample.get("video")
            sources = labels[media]["sources"]
            assert set(sources) <= pool  # test items use test digits only
            values = [int(digits.target[i]) for i in sources]  # the truth, from scikit-learn's labels
            turns = sample["conversations"]
            assert turns[0]["value"].startswith("<image>\n" if "image" in sample else "<video>\n")
            assert len(turns) == 2 if split == "test" else 4 <= len(turns) <= 8
            if split == "train":  # the caption turn last: every digit in reading (frame) order
                assert turns[-1]["value"] == " ".join(map(str, values))
            for question, answer in zip(turns[0::2], turns[1::2]):
                text = question["value"].split("\n", 1)[-1]
                category, expected = expected_answer(text, values)
                assert answer["value"] == expected, (sample["id"], text, answer)
                seen["image" if "image" in sample else "clip"].add(category)
            if "image" in sample:  # the cell at each position is that source digit, upscaled
                pixels = np.asarray(load_image(tmp_path / media))[:, :, 0]
                for cell, source in enumerate(sources):
                    row, col = divmod(cell, 2)
                    crop = pixels[row * CELL:(row + 1) * CELL, col * CELL:(col + 1) * CELL]
                    assert np.array_equal(crop, digit_cell(digits.images[source]))
            else:  # frame i is source i, upscaled 4x
                frames = sorted((tmp_path / media).iterdir())
                assert len(frames) == 3
                for frame, source in zip(frames, sources):
                    pixels = np.asarray(load_image(frame))[:, :, 0]
                    assert np.array_equal(pixels[::2, ::2], digit_cell(digits.images[source]))
    assert seen == {"image": {*IMAGE_KINDS, "caption"}, "clip": {*CLIP_KINDS, "caption"}}

    for name, media_key, count in (("test_questions.jsonl", "image", 30), ("test_video_questions.jsonl", "video", 9)):
        questions = [json.loads(line) for line in (tmp_path / name).read_text().splitlines()]
        assert len(questions) == count
        for question in questions:  # the eval files carry the same answers, category included
            values = [int(digits.target[i]) for i in labels[question[media_key]]["sources"]]
            assert (question["category"], question["answer"]) == expected_answer(question["text"], values)
    # the data loads with the training pipeline's reader
    assert len(load_samples(str(tmp_path / "train.json"))) == 75


def test_answers_are_balanced_so_the_text_prior_stays_low(tmp_path):
    """Answers stay near balanced over every turn of the train samples: presence yes about half the time,
    count 0, 1 or 2 each a sizeable share, and no corner, frame or digit dominating."""
    build(tmp_path, train_images=500, test_images=5, train_clips=150, test_clips=3, frames=4, seed=0, turns=5)
    answers = {}
    for sample in json.loads((tmp_path / "train.json").read_text()):  # every turn, not only the first
        turns = sample["conversations"]
        for question, answer in zip(turns[0::2], turns[1::2]):
            kind = ("clip " if "video" in sample else "") + category_of(question["value"].split("\n", 1)[-1])
            words = answer["value"].split()  # the subject named first ("7 yes", "7 top left"), then the value
            answers.setdefault(kind, []).append(" ".join(words[1:]) if kind == "where" else words[-1])
    shares = {kind: {a: v.count(a) / len(v) for a in set(v)} for kind, v in answers.items()}
    assert abs(shares["presence"]["yes"] - 0.5) < 0.06 and abs(shares["clip presence"]["yes"] - 0.5) < 0.1
    counts = ("none", "once", "twice")
    for kind in ("count", "clip count"):
        assert all(0.12 < shares[kind][c] < 0.5 for c in counts) and set(shares[kind]) == set(counts), shares[kind]
    assert max(shares["where"].values()) < 0.33
    assert max(shares["position"].values()) < 0.15 and max(shares["clip frame"].values()) < 0.2


def test_build_command_is_deterministic(tmp_path):
    for name in ("a", "b"):
        subprocess.run([sys.executable, "-m", "llava_voco.demo.digitgrid", "build", "--out", str(tmp_path / name),
                        "--train-images", "5", "--test-images", "2", "--train-clips", "2", "--test-clips", "1"],
                       check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert (tmp_path / "a" / "train.json").read_text() == (tmp_path / "b" / "train.json").read_text()
    assert (tmp_path / "a" / "images" / "test_00001.png").read_bytes() == (tmp_path / "b" / "images" / "test_00001.png").read_bytes()


def test_base_models_are_the_same_when_built_again_from_the_same_data(tmp_path):
    """What a rerun of the demo starts from: the same data and sizes give the same tower and LLM weights and
    the same tokenizer, so a difference between two runs' ``full`` comes from their data or flags, not from
    the base build (2026-12-03: two runs differed because their data's train clips did)."""
    import torch
    import sentencepiece as spm
    from safetensors.torch import load_file

    from llava_voco.demo.models import BaseSizes, build_base

    build(tmp_path / "data", train_images=64, test_images=8, train_clips=8, test_clips=4, frames=4)
    sizes = BaseSizes(vision_pretrain_steps=12, vision_pretrain_batch=16, llm_pretrain_steps=6, llm_pretrain_batch=8)
    summaries = [build_base(tmp_path / "data", tmp_path / name, sizes) for name in ("a", "b")]
    assert summaries[0]["stage0"] == summaries[1]["stage0"]
    weights = {part: [load_file(tmp_path / name / part / "model.safetensors") for name in ("a", "b")]
               for part in ("vision_tower", "llm")}
    for part, (first, second) in weights.items():
        assert first.keys() == second.keys()
        assert all(torch.equal(first[key], second[key]) for key in first), part
    pieces = [[p.id_to_piece(i) for i in range(p.get_piece_size())]
              for p in (spm.SentencePieceProcessor(model_file=str(tmp_path / name / "llm" / "tokenizer.model"))
                        for name in ("a", "b"))]
    assert pieces[0] == pieces[1]
    # Stage 0 draws its own pictures from the split's train digits: data with more train grids (the same split)
    # gives the same tower, another base seed (--second-base) another one
    build(tmp_path / "other", train_images=96, test_images=8, train_clips=8, test_clips=4, frames=4)
    assert load_image(tmp_path / "other" / "images" / "train_00063.png").tobytes() == \
        load_image(tmp_path / "data" / "images" / "train_00063.png").tobytes()
    tower = weights["vision_tower"][0]
    build_base(tmp_path / "other", tmp_path / "c", sizes)
    same = load_file(tmp_path / "c" / "vision_tower" / "model.safetensors")
    assert all(torch.equal(same[key], tower[key]) for key in tower)
    build_base(tmp_path / "data", tmp_path / "d", replace(sizes, seed=1))
    other = load_file(tmp_path / "d" / "vision_tower" / "model.safetensors")
    assert not any(torch.equal(other[key], tower[key]) for key in tower if key.endswith("weight") and other[key].dim() == 2)


def test_stage0_pictures_are_the_rendered_grids_and_frames_as_the_image_processor_gives_them(tmp_path):
    """Stage 0 composes its grids and frames in tensor space (``models.DigitCells``) instead of reading PNGs:
    without the jitter they are, to float precision, what the tower's CLIP image processor makes of
    ``digitgrid``'s rendered pictures of the same train digits, and with it each digit moves by at most a pixel."""
    import numpy as np
    import torch
    from transformers import CLIPImageProcessorPil

    from llava_voco.demo import digitgrid
    from llava_voco.demo.models import DigitCells

    build(tmp_path / "data", train_images=8, test_images=4, train_clips=2, test_clips=2, frames=4)
    processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    cells = DigitCells(tmp_path / "data", processor, "train", seed=0)
    pixels, target, train_indices, _ = digitgrid.load_digits_split(0)
    train_cells = [digitgrid.digit_cell(pixels[i]) for i in train_indices]
    rows = torch.randint(len(train_indices), (3, 4), generator=torch.Generator().manual_seed(0))
    grids, digits = DigitCells(tmp_path / "data", processor, "train", seed=0).grids(3)
    assert torch.equal(digits, torch.tensor(target[train_indices])[rows])
    rendered = processor([digitgrid.grid_image([train_cells[int(i)] for i in row]) for row in rows],
                         return_tensors="pt")["pixel_values"]
    assert torch.allclose(grids, rendered, atol=1e-5)
    frames, frame_digits = cells.frames(2)
    assert frames.shape == (2, 3, 32, 32) and frame_digits.shape == (2,)
    jittered, jittered_digits = DigitCells(tmp_path / "data", processor, "train", seed=0).grids(8, jitter=1)
    plain, plain_digits = DigitCells(tmp_path / "data", processor, "train", seed=0).grids(8)
    assert torch.equal(plain[:3], grids) and torch.equal(jittered_digits, plain_digits)  # only where they sit moved

    def cell(picture, quadrant):  # [3, 16, 16]
        row, col = divmod(quadrant, 2)
        return picture[:, row * 16:(row + 1) * 16, col * 16:(col + 1) * 16]

    background = plain[0, :, :1, :1]  # a blank corner: pixel value 0 normalised

    def shifted(picture, dy, dx):
        out = background.expand_as(picture).clone()
        out[:, max(dy, 0):16 + min(dy, 0), max(dx, 0):16 + min(dx, 0)] = \
            picture[:, max(-dy, 0):16 + min(-dy, 0), max(-dx, 0):16 + min(-dx, 0)]
        return out

    moves = []
    for picture, moved in zip(plain, jittered):
        for quadrant in range(4):
            found = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)
                     if torch.allclose(shifted(cell(picture, quadrant), dy, dx), cell(moved, quadrant), atol=1e-5)]
            assert found, "a jittered cell is its digit moved by at most one pixel"
            moves.append(found[0])
    assert len(set(moves)) > 1


def test_the_llm_text_stage_reads_grids_written_as_digit_tokens(tmp_path):
    """The LLM's text stage (models.pretrain_llm): each sample lays the image out as digit tokens where its
    patch tokens go (each patch the digit of its quadrant; a clip frame all its own digit), asks questions in
    the data's template and answer format, and learns only the replies; the answers follow from the digits
    written in the prompt, worked out here."""
    from llava_voco.conversation import get_template
    from llava_voco.demo.models import CONV_MODE, BaseSizes, TextGrids, corpus_from_data, quadrant_of_patches, \
        train_sentencepiece_tokenizer

    build(tmp_path / "data", train_images=40, test_images=4, train_clips=10, test_clips=2, frames=4, turns=5,
          caption=True)
    tokenizer = train_sentencepiece_tokenizer(corpus_from_data(tmp_path / "data"), tmp_path / "tok", 512)
    opening, closing = get_template(CONV_MODE).turn_markers()
    assert tokenizer.tokenize(f"{opening} Is there a 7? {closing} 7 yes") == \
        [opening, "▁Is", "▁there", "▁a", "▁", "7", "?", "▁", closing, "▁", "7", "▁yes"]  # the markers: one piece each
    patches = (BaseSizes.image_size // BaseSizes.patch_size) ** 2
    grids = TextGrids(tokenizer, BaseSizes.image_size // BaseSizes.patch_size, frames=4, seed=0)
    quadrant = quadrant_of_patches(4).tolist()
    seen = set()
    for index in range(40):
        clip = index % 2 == 1
        ids, labels, places, kind = grids.sample(clip)
        tokens = tokenizer.convert_ids_to_tokens(ids)
        start = tokens.index(opening) + 1 + (tokens[tokens.index(opening) + 1] == "▁")  # "[INST] " then the image
        shown = tokens[start:start + patches * (4 if clip else 1)]
        assert all(token.isdigit() for token in shown), tokens
        digits = [int(shown[f * patches]) for f in range(4)] if clip else \
            [int(shown[quadrant.index(q)]) for q in range(4)]
        assert shown == ([str(d) for d in digits for _ in range(patches)] if clip else [str(digits[q]) for q in quadrant])
        # a grid's tokens carry their quadrant (added as its words' embeddings); a clip's frames and the text none
        image_places = places[start:start + len(shown)]
        assert image_places == ([-1] * len(shown) if clip else quadrant)
        assert set(places[:start] + places[start + len(shown):]) == {-1}
        text = tokenizer.decode(ids[start + len(shown):])
        learned = tokenizer.decode([i for i, label in zip(ids, labels) if label != -100])
        for question, answer in re.findall(r"(?:\n|\[INST\] )([^\[\n]+\?) \[/INST\] ([^<]+?) </s>", text):
            category, expected = expected_answer(question, digits)
            assert answer == expected and answer in learned, (question, answer, digits)
            seen.add(("clip " if clip else "") + category)
        assert "INST" not in learned
    assert {"presence", "largest", "caption", "clip caption", "clip frame"} <= seen


def test_the_text_decoder_vocabulary_is_the_same_in_every_process(tmp_path):
    """LLaMA-VID's rows read questions through the base build's WordPiece tokenizer: a vocabulary that depended
    on the process (``WordPieceTrainer``'s ties fell out by string hashing) made two fresh runs' rows differ.
    Built in processes with different hash seeds, it is the same, and keeps the corpus's words whole."""
    build(tmp_path / "data", train_images=40, test_images=4, train_clips=10, test_clips=2, frames=4, turns=5,
          caption=True)
    script = ("import json, sys; from pathlib import Path; from llava_voco.demo.models import corpus_from_data; "
              "from llava_voco.demo.tiny import train_wordpiece_tokenizer; "
              "print(json.dumps(train_wordpiece_tokenizer(corpus_from_data(Path(sys.argv[1])), vocab_size=200).get_vocab()))")
    vocabularies = [json.loads(subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "data")], check=True, capture_output=True, text=True,
        env={**os.environ, "PYTHONHASHSEED": str(hash_seed), "PYTHONPATH": str(Path(__file__).parents[1])}).stdout)
        for hash_seed in (1, 2, 3)]
    assert vocabularies[0] == vocabularies[1] == vocabularies[2]
    for word in ("which", "digit", "frame", "there"):
        assert word in vocabularies[0], word
