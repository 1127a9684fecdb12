"""The data pipeline: LLaVA's JSON/JSONL samples -> dataset items -> batches -> the VoCo model."""

import json
import logging
import math

import pytest
import torch
from transformers import HfArgumentParser

import llava_voco
from llava_voco.conversation import UnknownTemplateError
from llava_voco.constants import IGNORE_INDEX
from llava_voco.image_io import expand_to_square
from llava_voco.train.collator import BATCH_STAT_KEYS, is_skipped, pop_batch_stats
from llava_voco.train.data import DataArguments, DataError, LazySupervisedDataset, make_supervised_data_module
from llava_voco.train.samplers import LengthGroupedSampler, modality_length_grouped_indices

from conftest import load_voco
from test_conversation import GOLDEN, golden_turns

TOKENS_PER_IMAGE = 16  # the tiny CLIP: 16 x 16 px, patch 4, CLS dropped


def sample(sample_id, *turns, image=None):
    """A LLaVA sample; turns alternate human, gpt."""
    record = {"id": sample_id, "conversations": [
        {"from": "human" if n % 2 == 0 else "gpt", "value": value} for n, value in enumerate(turns)
    ]}
    if image is not None:
        record["image"] = image
    return record


def write_data(path, samples, jsonl=False):
    with open(path, "w") as handle:
        if jsonl:
            handle.writelines(json.dumps(s) + "\n" for s in samples)
        else:
            json.dump(samples, handle)
    return str(path)


def dataset(path, processor, folder, version="v1", model_max_length=2048, **args):
    data_args = DataArguments(data_path=str(path), image_folder=str(folder), **{"is_multimodal": True, **args})
    return LazySupervisedDataset(path, processor, data_args, version=version, model_max_length=model_max_length)


@pytest.fixture(scope="module")
def voco_model(voco_dir):
    """In float64, so that a loss comparison can tell one image from another in this untrained model."""
    model, processor = load_voco(voco_dir)
    return model.double(), processor


# ---- golden: exact ids and labels for each template -------------------------------------------------

# The learned tokens of each reply (its text and end-of-turn token), written out.
GOLDEN_LABEL_TOKENS = {
    "plain": [["▁sev", "en", "\n"]],
    "v1": [["▁sev", "en", "</s>"], ["▁fou", "r", "</s>"]],
    "llava_llama_2": [["▁sev", "en", "▁", "</s>"], ["▁fou", "r", "▁", "</s>"]],
    "mistral_instruct": [["▁sev", "en", "▁", "</s>"], ["▁fou", "r", "▁", "</s>"]],
    "chatml_direct": [["s", "ev", "en", "<|im_end|>"], ["f", "ou", "r", "<|im_end|>"]],
    "llama_3": [["s", "ev", "en", "<|eot_id|>"], ["f", "ou", "r", "<|eot_id|>"]],
    "voco_official": [["▁sev", "en", "</s>"], ["▁fou", "r", "</s>"]],
}


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_ids_and_labels(name, chat_processor, image_folder, tmp_path):
    path = write_data(tmp_path / "golden.json", [
        sample("golden", *[value for _, value in golden_turns(name)], image="digit0.png")
    ])
    item = dataset(path, chat_processor, image_folder, version=name)[0]
    tokenizer = chat_processor.tokenizer
    image_block = "<image>" * TOKENS_PER_IMAGE + "<voco>" * 2

    def ids_of(prompt):
        return tokenizer(prompt.replace("<image>", image_block))["input_ids"]

    rounds, _ = GOLDEN[name]
    expected_ids = ids_of("".join(rounds))
    assert item["input_ids"].tolist() == expected_ids

    # Each reply's tokens end where its round ends; nothing else is learned.
    expected_labels = [IGNORE_INDEX] * len(expected_ids)
    for count, reply_tokens in enumerate(GOLDEN_LABEL_TOKENS[name], start=1):
        up_to_round = ids_of("".join(rounds[:count]))
        end = len(up_to_round)
        assert expected_ids[:end] == up_to_round  # the round ends on a token boundary
        start = end - len(reply_tokens)
        assert tokenizer.convert_ids_to_tokens(expected_ids[start:end]) == reply_tokens
        expected_labels[start:end] = expected_ids[start:end]
    assert end == len(expected_ids)
    assert item["labels"].tolist() == expected_labels

    assert item["pixel_values"].shape == (1, 3, 16, 16)
    assert (item["num_vision_tokens"], item["num_voco_tokens"]) == (TOKENS_PER_IMAGE, 2)


# ---- mixed files through the collator into the model ------------------------------------------------

MIXED = [
    sample("single", "What is the sum?\n<image>", "seven", image="digit0.png"),  # <image> moved to the front
    sample("text", "Say one two three.", "one two three"),
    sample("multi", "<image>\n<image>\nSame digit?", "no", image=["digit1.png", "digit2.png"]),
    sample("turns", "Which digit?", "zero", "And the count?", "one", image="digit3.png"),  # <image> added
    sample("text2", "Hi", "hello", "Again", "hello again"),
]


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("jsonl", [False, True])
def test_mixed_file_batches_into_the_model(voco_dir, voco_model, image_folder, tmp_path, padding_side, jsonl):
    model, processor = voco_model
    processor.tokenizer.padding_side = padding_side
    path = write_data(tmp_path / ("data.jsonl" if jsonl else "data.json"), MIXED, jsonl=jsonl)
    module = make_supervised_data_module(
        processor, DataArguments(data_path=path, image_folder=str(image_folder), is_multimodal=True, lazy_preprocess=True),
        version="v1", model_max_length=512,
    )
    data, collate = module["train_dataset"], module["data_collator"]
    assert module["eval_dataset"] is None and len(data) == len(MIXED)
    items = [data[i] for i in range(len(data))]
    assert [item.get("pixel_values", torch.empty(0)).shape[0] for item in items] == [1, 0, 2, 1, 0]

    batch = collate(items)
    stats = pop_batch_stats(batch)
    assert set(stats) == set(BATCH_STAT_KEYS)
    assert stats["num_vision_tokens"] == int((batch["input_ids"] == processor.image_token_id).sum()) == 4 * TOKENS_PER_IMAGE
    assert stats["num_voco_tokens"] == 4 and stats["num_samples_skipped"] == stats["num_samples_truncated"] == 0
    assert batch["pixel_values"].shape == (4, 3, 16, 16)
    in_order = torch.cat([items[0]["pixel_values"], items[2]["pixel_values"], items[3]["pixel_values"]])
    assert torch.equal(batch["pixel_values"], in_order)
    lengths = [len(item["input_ids"]) for item in items]
    mask = batch["attention_mask"]
    for row, length in enumerate(lengths):
        kept = slice(None, length) if padding_side == "right" else slice(mask.shape[1] - length, None)
        assert mask[row, kept].all() and mask[row].sum() == length
        assert torch.equal(batch["input_ids"][row, kept], items[row]["input_ids"])
        assert torch.equal(batch["labels"][row, kept], items[row]["labels"])
        assert (batch["labels"][row][mask[row] == 0] == IGNORE_INDEX).all()

    # Each row of the padded batch gives the logits of its sample alone: padding, labels and the order
    # of the images all line up (float64; left padding shifts the positions, which moves the logits by
    # ~1e-7 through the float32 rotary tables).
    with torch.no_grad():
        output = model(**as_double(batch))
        assert math.isfinite(output.loss.item())
        for row, (item, length) in enumerate(zip(items, lengths)):
            kept = slice(None, length) if padding_side == "right" else slice(mask.shape[1] - length, None)
            alone = model(**as_double(collate([item]))).logits[0]  # [length, vocab]
            torch.testing.assert_close(output.logits[row, kept], alone, rtol=1e-6, atol=1e-6)
    processor.tokenizer.padding_side = "right"


def as_double(batch):
    pop_batch_stats(batch)
    if "pixel_values" in batch:
        batch["pixel_values"] = batch["pixel_values"].double()
    return batch


def test_placeholder_added_or_moved_like_llava(voco_dir, image_folder, tmp_path):
    processor = llava_voco.VoCoLlavaProcessor.from_pretrained(voco_dir)
    path = write_data(tmp_path / "d.json", [
        sample("explicit", "<image>\nWhat is the sum?", "seven", image="digit0.png"),
        sample("absent", "What is the sum?", "seven", image="digit0.png"),
        sample("after", "What is the sum? <image>", "seven", image="digit0.png"),
    ])
    data = dataset(path, processor, image_folder)
    explicit = data[0]["input_ids"]
    assert torch.equal(data[1]["input_ids"], explicit) and torch.equal(data[2]["input_ids"], explicit)
    # Without --is_multimodal the placeholder stays where the data put it (LLaVA does the same).
    kept = dataset(path, processor, image_folder, is_multimodal=False)[2]["input_ids"]
    first_image = [int((ids == processor.image_token_id).nonzero()[0]) for ids in (explicit, kept)]
    assert first_image[1] > first_image[0] + 4  # after "What is the sum?"


def test_pad_fills_with_the_processor_mean(voco_dir, digit_images, tmp_path):
    processor = llava_voco.VoCoLlavaProcessor.from_pretrained(voco_dir)
    wide = digit_images[0].resize((16, 8))
    wide.save(tmp_path / "wide.png")
    path = write_data(tmp_path / "d.json", [sample("wide", "<image>\nWhat?", "a digit", image="wide.png")])
    padded = dataset(path, processor, tmp_path, image_aspect_ratio="pad")[0]["pixel_values"][0]  # [3, 16, 16]
    # The 16 x 8 image sits in rows 4..11; rows above and below are the mean colour: ~0 once normalised.
    assert padded[:, :4].abs().max() < 0.02 and padded[:, 12:].abs().max() < 0.02
    assert padded[:, 4:12].abs().max() > 0.5
    square = dataset(path, processor, tmp_path, image_aspect_ratio="square")[0]["pixel_values"][0]
    assert square[:, :4].abs().max() > 0.5  # the processor's own resize and crop: no padding
    canvas = expand_to_square(wide, (1, 2, 3))
    assert canvas.size == (16, 16) and canvas.getpixel((0, 0)) == (1, 2, 3)
    with pytest.raises(ValueError, match="'anyres' is not supported here"):
        DataArguments(image_aspect_ratio="anyres")


def test_llava_flags_parse():
    (args,) = HfArgumentParser(DataArguments).parse_args_into_dataclasses([
        "--data_path", "d.json", "--lazy_preprocess", "True", "--is_multimodal", "True",
        "--image_folder", "imgs", "--image_aspect_ratio", "pad", "--skip_bad_samples", "True",
    ])
    assert (args.data_path, args.lazy_preprocess, args.is_multimodal) == ("d.json", True, True)
    assert (args.image_folder, args.image_aspect_ratio, args.skip_bad_samples) == ("imgs", "pad", True)


# ---- truncation ------------------------------------------------------------------------------------

THREE_ROUNDS = sample(
    "long", "<image>\nWhich digit?", "zero", "And the count of digits?", "one digit in all", "Sure?", "yes", image="digit0.png"
)


def test_truncation_cuts_at_a_round_boundary(voco_dir, image_folder, tmp_path, caplog):
    processor = llava_voco.VoCoLlavaProcessor.from_pretrained(voco_dir, voco_tokens=1)
    full_path = write_data(tmp_path / "full.json", [THREE_ROUNDS])

    def first_rounds(count):
        part = dict(THREE_ROUNDS, conversations=THREE_ROUNDS["conversations"][: 2 * count])
        return dataset(write_data(tmp_path / f"first{count}.json", [part]), processor, image_folder)[0]

    full = dataset(full_path, processor, image_folder)[0]
    first, first_two = first_rounds(1), first_rounds(2)
    assert len(first["input_ids"]) < len(first_two["input_ids"]) < len(full["input_ids"])

    # The last round that fits is kept whole; the third is dropped.
    data = dataset(full_path, processor, image_folder, model_max_length=len(full["input_ids"]) - 1)
    with caplog.at_level(logging.WARNING):
        cut = data[0]
    assert torch.equal(cut["input_ids"], first_two["input_ids"]) and torch.equal(cut["labels"], first_two["labels"])
    assert cut["num_samples_truncated"] == 1 and data.stats["truncated"] == 1
    assert "'long'" in caplog.text and "cut after round 2" in caplog.text

    # Room for the image and part of the first reply only: no partial answer is learned, and with no whole
    # reply left the sample is skipped (counted and logged).
    limit = len(first["input_ids"]) - 1  # drops the first reply's </s>
    with_short = write_data(tmp_path / "with_short.json", [THREE_ROUNDS, sample("short", "Hi", "ok")])
    inside = dataset(with_short, processor, image_folder, model_max_length=limit)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        item = inside[0]
    assert is_skipped(item) and item["num_samples_skipped"] == 1 and item["num_replies_dropped"] == 1
    assert inside.stats["skipped_too_long"] == 1 and inside.stats["replies_dropped"] == 1
    assert "'long'" in caplog.text and "no whole reply within model_max_length" in caplog.text


def test_a_reply_cut_by_the_limit_is_not_learned(voco_dir, image_folder, tmp_path, caplog):
    """No round ends after the image and within the limit, so the cut falls inside the second reply: that
    reply's labels are dropped (a partial answer would teach the model to stop mid-sentence without its end
    of turn); the first round's reply, whole, is still learned. Counted and logged."""
    processor = llava_voco.VoCoLlavaProcessor.from_pretrained(voco_dir, voco_tokens=1)
    path = write_data(tmp_path / "d.json", [sample("second", "Hi", "hello", "<image>\nWhat is it?", "a seven", image="digit0.png")])
    full = dataset(path, processor, image_folder)[0]
    first_round = dataset(write_data(tmp_path / "r1.json", [sample("r1", "Hi", "hello")]), processor, image_folder)[0]
    limit = len(full["input_ids"]) - 1  # drops the second reply's </s>
    data = dataset(path, processor, image_folder, model_max_length=limit)
    with caplog.at_level(logging.WARNING):
        cut = data[0]
    assert torch.equal(cut["input_ids"], full["input_ids"][:limit])
    learned = cut["input_ids"][cut["labels"] != IGNORE_INDEX]
    assert torch.equal(learned, first_round["input_ids"][first_round["labels"] != IGNORE_INDEX])  # "hello</s>"
    assert processor.tokenizer.decode(learned) == "hello</s>"
    assert cut["num_samples_truncated"] == 1 and cut["num_replies_dropped"] == 1
    assert data.stats["truncated"] == 1 and data.stats["replies_dropped"] == 1
    assert "'second'" in caplog.text and "labels of the reply it cuts dropped" in caplog.text


def test_image_block_that_does_not_fit_is_skipped(voco_dir, image_folder, tmp_path, caplog):
    processor = llava_voco.VoCoLlavaProcessor.from_pretrained(voco_dir, voco_tokens=1)
    path = write_data(tmp_path / "d.json", [
        sample("late-image", "A long question about the digits in the grid " * 3 + "<image>", "zero", image="digit0.png"),
        sample("short", "Hi", "hello"),
    ])
    data = dataset(path, processor, image_folder, model_max_length=60, is_multimodal=False)
    with caplog.at_level(logging.WARNING):
        item = data[0]
    assert "'late-image'" in caplog.text and "image tokens and VoCo tokens end at token" in caplog.text
    # Never an image block cut in two: nothing of the sample came out, and nothing took its place.
    assert is_skipped(item) and item["num_samples_skipped"] == 1
    assert data.stats["skipped_too_long"] == 1 and data.stats["items"] == 0


def test_image_block_is_kept_whole_or_not_at_all(voco_dir, image_folder, tmp_path):
    """An image in the second round: a limit right at the end of its VoCo token keeps the block whole
    (and the first round); one token less skips the sample."""
    processor = llava_voco.VoCoLlavaProcessor.from_pretrained(voco_dir, voco_tokens=1)
    path = write_data(tmp_path / "d.json", [
        sample("second", "Hi", "hello", "<image>\nWhat is it?", "a seven", image="digit0.png"),
        sample("short", "Hi", "hello"),
    ])
    full = dataset(path, processor, image_folder)[0]["input_ids"]
    image_end = int((full == processor.voco_token_id).nonzero()[-1]) + 1
    kept = dataset(path, processor, image_folder, model_max_length=image_end)[0]
    assert torch.equal(kept["input_ids"], full[:image_end]) and kept["num_samples_skipped"] == 0
    assert kept["num_vision_tokens"] == TOKENS_PER_IMAGE and kept["pixel_values"].shape[0] == 1
    skipped = dataset(path, processor, image_folder, model_max_length=image_end - 1)
    item = skipped[0]
    assert is_skipped(item) and item["num_samples_skipped"] == 1 and skipped.stats["skipped_too_long"] == 1


def test_text_only_sample_with_no_reply_in_reach_is_skipped(voco_dir, image_folder, tmp_path, caplog):
    processor = llava_voco.VoCoLlavaProcessor.from_pretrained(voco_dir)
    path = write_data(tmp_path / "d.json", [
        sample("wordy", "one two three four five six seven eight nine " * 4, "ok"),
        sample("short", "Hi", "hello"),
    ])
    data = dataset(path, processor, image_folder, model_max_length=40)
    with caplog.at_level(logging.WARNING):
        item = data[0]
    assert "'wordy'" in caplog.text and "no reply token within model_max_length=40" in caplog.text
    assert is_skipped(item) and item["num_samples_skipped"] == 1
    # "short" (43 tokens): the limit cuts its only reply, whose first tokens are not learned alone; with
    # that, every sample was skipped, which stops training rather than run on empty batches.
    with caplog.at_level(logging.WARNING), pytest.raises(RuntimeError, match="d.json: every sample was skipped"):
        data[1]
    assert "'short'" in caplog.text and "no whole reply within model_max_length=40" in caplog.text
    assert data.stats["skipped_too_long"] == 2 and data.stats["items"] == 0


# ---- bad samples ------------------------------------------------------------------------------------

GOOD = sample("good", "<image>\nWhat?", "a digit", image="digit1.png")
BAD = {
    "missing image file": sample("bad", "<image>\nWhat?", "x", image="nowhere.png"),
    "unreadable image file": sample("bad", "<image>\nWhat?", "x", image="broken.png"),
    "2 <image> placeholder\\(s\\) in the turns but 1 image\\(s\\) listed": sample(
        "bad", "<image>\n<image>\nWhat?", "x", image="digit0.png"),
    "1 <image> placeholder\\(s\\) in the turns but 0 image\\(s\\) listed": sample("bad", "<image>\nWhat?", "x"),
    "no 'conversations'": {"id": "bad", "image": "digit0.png"},
    "roles out of order": {"id": "bad", "conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]},
    "empty assistant turn": sample("bad", "What?", "   "),
    "turn 1 \\(gpt\\) contains <image>": sample("bad", "<image>\nWhat?", "<image>", image="digit0.png"),
    "turn 0 contains the reserved VoCo token '<voco>'": sample("bad", "What is <voco>?", "x"),
    "'image' must be a path or a list of paths, got 3": dict(sample("bad", "What?", "x"), image=3),
}


@pytest.mark.parametrize("problem", list(BAD))
def test_bad_sample_raises_with_id_file_and_problem(problem, voco_dir, image_folder, tmp_path, caplog):
    processor = llava_voco.VoCoLlavaProcessor.from_pretrained(voco_dir)
    (image_folder / "broken.png").write_bytes(b"this is not a png")
    path = write_data(tmp_path / "bad.json", [BAD[problem], GOOD])
    with pytest.raises(DataError, match=f"{tmp_path}/bad.json: sample id 'bad' \\(index 0\\): {problem}"):
        dataset(path, processor, image_folder, check_samples=False)[0]

    data = dataset(path, processor, image_folder, check_samples=False, skip_bad_samples=True)
    with caplog.at_level(logging.WARNING):
        item = data[0]
    assert item["num_samples_skipped"] == 1 and data.stats["skipped_bad"] == 1
    assert is_skipped(item) and not is_skipped(data[1])  # no other sample takes its place
    assert "skipping bad sample" in caplog.text and "'bad'" in caplog.text


WORDS = "zero one two three four five six seven eight nine".split()


def test_an_epoch_holds_each_usable_sample_once(voco_dir, image_folder, tmp_path):
    """Skipped samples (a bad one, one too long) are left out of their batch and counted there; no other
    sample stands in for them, so through LLaVA's modality-grouped sampler and the collator (as the
    Trainer draws them) each usable sample appears exactly once and each batch holds one modality."""
    processor = llava_voco.VoCoLlavaProcessor.from_pretrained(voco_dir)
    # 6 image and 6 text-only samples with the skipped ones: whole batches of 2, no mixed leftover batch
    samples = [sample(f"image-{n}", "<image>\nWhich digit?", WORDS[n], image=f"digit{n}.png") for n in range(5)]
    samples += [sample(f"text-{n}", "Say a word.", WORDS[n]) for n in range(5)]
    samples.insert(1, sample("bad", "<image>\nWhat?", "x", image="nowhere.png"))
    samples.insert(6, sample("wordy", " ".join(WORDS) * 12, "ok"))  # no reply within the limit
    path = write_data(tmp_path / "d.json", samples)
    usable = [s["id"] for s in samples if s["id"] not in ("bad", "wordy")]
    args = dict(check_samples=False, skip_bad_samples=True, model_max_length=100)
    reference = dataset(path, processor, image_folder, **args)
    id_of = {}
    for index, record in enumerate(samples):
        item = reference[index]
        if not is_skipped(item):
            id_of[tuple(item["input_ids"].tolist())] = record["id"]
    assert sorted(id_of.values()) == sorted(usable)

    data = dataset(path, processor, image_folder, **args)
    collate = make_supervised_data_module(processor, DataArguments(data_path=path, check_samples=False), version="v1",
                                          model_max_length=100)["data_collator"]
    sampler = LengthGroupedSampler(2, lengths=data.modality_lengths, generator=torch.Generator().manual_seed(0),
                                   group_by_modality=True)
    seen, skipped, counted = [], 0, 0
    for batch in torch.utils.data.DataLoader(data, batch_size=2, sampler=sampler, collate_fn=collate):
        stats = pop_batch_stats(batch)
        skipped += stats["num_samples_skipped"]
        counted += stats["num_samples"]
        rows = [tuple(ids[mask.bool()].tolist()) for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
        if stats["num_samples"]:
            seen.extend(id_of[row] for row in rows)
            assert len({id_of[row].startswith("image") for row in rows}) == 1, rows  # one modality per batch
    assert sorted(seen) == sorted(usable)  # each once: none twice, none lost
    assert skipped == 2 and counted == len(usable)
    assert data.stats["skipped_bad"] == 1 and data.stats["skipped_too_long"] == 1 and data.stats["items"] == len(usable)


def test_a_batch_of_skipped_samples_is_one_unlearned_row(voco_dir, image_folder, tmp_path):
    """When every sample of a batch was skipped the Trainer still needs a batch (every rank runs each step):
    one attended pad token with no label, counted as no sample."""
    processor = llava_voco.VoCoLlavaProcessor.from_pretrained(voco_dir)
    path = write_data(tmp_path / "d.json", [BAD["missing image file"], BAD["empty assistant turn"], GOOD])
    data = dataset(path, processor, image_folder, check_samples=False, skip_bad_samples=True)
    collate = make_supervised_data_module(processor, DataArguments(data_path=path, check_samples=False), version="v1",
                                          model_max_length=64)["data_collator"]
    batch = collate([data[0], data[1], None])
    stats = pop_batch_stats(batch)
    assert stats["num_samples"] == 0 and stats["num_samples_skipped"] == 3 and stats["num_vision_tokens"] == 0
    assert batch["input_ids"].tolist() == [[processor.tokenizer.pad_token_id]]
    assert batch["attention_mask"].tolist() == [[1]] and batch["labels"].tolist() == [[IGNORE_INDEX]]
    assert "pixel_values" not in batch
    mixed = collate([data[0], data[2]])
    assert pop_batch_stats(mixed)["num_samples"] == 1 and len(mixed["input_ids"]) == 1
    assert torch.equal(mixed["input_ids"][0], data[2]["input_ids"])


def test_a_tokenizer_without_offsets_is_refused(voco_dir, image_folder, tmp_path, monkeypatch):
    """Labels come from the tokenizer's character offsets: a tokenizer that gives none (all zero) would
    leave every reply unlearned without a word, so it is refused, naming it."""
    processor = llava_voco.VoCoLlavaProcessor.from_pretrained(voco_dir)
    data = dataset(write_data(tmp_path / "d.json", [GOOD]), processor, image_folder)
    real_call = type(processor).__call__

    def without_offsets(self, *args, **kwargs):
        encoded = real_call(self, *args, **kwargs)
        encoded["offset_mapping"] = torch.zeros_like(encoded["offset_mapping"])
        return encoded

    monkeypatch.setattr(type(processor), "__call__", without_offsets)
    with pytest.raises(ValueError, match="gives no character offsets"):
        data[0]

    def no_offsets(self, *args, **kwargs):
        encoded = real_call(self, *args, **kwargs)
        del encoded["offset_mapping"]
        return encoded

    monkeypatch.setattr(type(processor), "__call__", no_offsets)
    with pytest.raises(ValueError, match="gives no character offsets"):
        data[0]


def test_malformed_json_lines_name_the_line(voco_dir, tmp_path):
    processor = llava_voco.VoCoLlavaProcessor.from_pretrained(voco_dir)
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + '{"id": "cut off", "conversations": [' + "\n")
    with pytest.raises(ValueError, match="d.jsonl: line 2 is not valid JSON"):
        dataset(path, processor, tmp_path)


def test_eager_mode_checks_everything_up_front(voco_dir, image_folder, tmp_path):
    processor = llava_voco.VoCoLlavaProcessor.from_pretrained(voco_dir)
    path = write_data(tmp_path / "d.json", [GOOD, BAD["missing image file"], GOOD, BAD["empty assistant turn"]])
    with pytest.raises(DataError, match="sample id 'bad' \\(index 1\\): missing image file"):
        dataset(path, processor, image_folder, lazy_preprocess=False)
    data = dataset(path, processor, image_folder, lazy_preprocess=False, skip_bad_samples=True)
    assert len(data) == 2 and data.stats["skipped_bad"] == 2
    assert data.modality_lengths == [4 + TOKENS_PER_IMAGE + 1] * 2


# ---- the check before training (--check_samples) ----------------------------------------------------

def test_bad_samples_are_refused_together_before_training(voco_dir, image_folder, tmp_path, caplog):
    """A corrupt image at sample 70 of 81 (and an empty image file, a missing one, a malformed sample): one
    error before any sample is drawn, one line that counts them, names the first three (file, id, index,
    problem) and the flag that skips them; with that flag the others train."""
    processor = llava_voco.VoCoLlavaProcessor.from_pretrained(voco_dir)
    (image_folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not the rest of a png" * 8)
    (image_folder / "empty.png").write_bytes(b"")
    samples = [sample(f"s{n}", "<image>\nWhich digit?", WORDS[n % 8], image=f"digit{n % 8}.png") for n in range(81)]
    samples[12]["image"] = "empty.png"
    samples[30]["image"] = "nowhere.png"
    samples[50] = sample("s50", "<image>\nWhat?", "   ", image="digit0.png")
    samples[70]["image"] = "corrupt.png"
    path = write_data(tmp_path / "d.json", samples)
    with pytest.raises(DataError) as raised:
        dataset(path, processor, image_folder)
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: 4 of 81 samples cannot be used: sample id 's12' (index 12): unreadable "
                              f"image file {image_folder}/empty.png: empty file (0 bytes)"), message
    assert f"sample id 's30' (index 30): missing image file {image_folder}/nowhere.png" in message
    assert "sample id 's50' (index 50): " in message and "; and 1 more" in message and "s70" not in message
    assert message.endswith("(fix or remove them, or pass --skip_bad_samples True to train without them)")

    with caplog.at_level(logging.WARNING):
        data = dataset(path, processor, image_folder, skip_bad_samples=True)
    assert len(data) == 77 and data.stats["skipped_bad"] == 4
    assert f"{path}: skipped 4 of 81 samples as bad (--skip_bad_samples)" in caplog.text
    assert "(index 70): unreadable image file" in caplog.text and "corrupt.png: not an image file PIL can read" in caplog.text
    drawn = [data[i] for i in range(len(data))]  # the usable ones, in order, none skipped when drawn
    assert not any(is_skipped(item) for item in drawn) and data.stats["items"] == 77


def test_the_check_reads_headers_only(voco_dir, image_folder, tmp_path):
    """An image whose header is sound but whose pixels are cut off passes the check (no pixels are decoded
    before training) and is named when it is drawn."""
    processor = llava_voco.VoCoLlavaProcessor.from_pretrained(voco_dir)
    whole = (image_folder / "digit0.png").read_bytes()
    (image_folder / "cut.png").write_bytes(whole[: len(whole) // 2])
    path = write_data(tmp_path / "d.json", [GOOD, sample("cut", "<image>\nWhat?", "x", image="cut.png")])
    data = dataset(path, processor, image_folder)
    assert len(data) == 2
    with pytest.raises(DataError, match=f"sample id 'cut' \\(index 1\\): unreadable image file {image_folder}/cut.png"):
        data[1]


def test_unknown_version_and_missing_pad_token(voco_dir, tmp_path):
    processor = llava_voco.VoCoLlavaProcessor.from_pretrained(voco_dir)
    path = write_data(tmp_path / "d.json", [GOOD])
    args = DataArguments(data_path=path)
    with pytest.raises(UnknownTemplateError, match="unknown conversation template --version 'v9'; known: .*chatml_direct"):
        make_supervised_data_module(processor, args, version="v9", model_max_length=64)
    processor.tokenizer.pad_token = None
    with pytest.raises(ValueError, match="no pad token"):
        make_supervised_data_module(processor, args, version="v1", model_max_length=64)


# ---- lengths and the sampler ------------------------------------------------------------------------

def test_lengths_without_opening_images(voco_dir, image_folder, tmp_path):
    processor = llava_voco.VoCoLlavaProcessor.from_pretrained(voco_dir, voco_tokens=1)
    samples = [
        sample("a", "<image>\nWhat is it?", "a seven", image="gone.png"),  # no such file
        sample("b", "Two words", "three words here"),
        sample("c", "<image>\n<image>\nSame?", "no", image=["gone.png", "unreadable.png"]),
        sample("d", "", "x"),
    ]
    (image_folder / "unreadable.png").write_bytes(b"garbage")
    data = dataset(write_data(tmp_path / "d.json", samples), processor, image_folder, check_samples=False)
    per_image = TOKENS_PER_IMAGE + 1
    assert data.tokens_per_image == per_image
    assert data.lengths == [6 + per_image, 5, 4 + 2 * per_image, 1]  # LLaVA counts "<image>" as a word
    assert data.modality_lengths == [6 + per_image, -5, 4 + 2 * per_image, -1]
    # The estimate of the image part is exact: a real item has that many image and VoCo tokens.
    real = dataset(write_data(tmp_path / "r.json", [GOOD]), processor, image_folder)[0]
    assert real["num_vision_tokens"] + real["num_voco_tokens"] == per_image


def batches_of(indices, size):
    return [indices[k : k + size] for k in range(0, len(indices), size)]


@pytest.mark.parametrize("world_size", [1, 2])
def test_modality_sampler_batches_image_and_text_apart(world_size):
    torch.manual_seed(0)
    lengths = [int(x) for x in torch.randint(20, 200, (23,))] + [-int(x) for x in torch.randint(5, 100, (18,))]
    order = torch.randperm(len(lengths)).tolist()
    lengths = [lengths[i] for i in order]
    sampler = LengthGroupedSampler(2, world_size, lengths=lengths, generator=torch.Generator().manual_seed(1),
                                   group_by_modality=True)
    indices = list(sampler)
    assert sorted(indices) == list(range(len(lengths))) and len(sampler) == len(lengths)
    mixed = [b for b in batches_of(indices, 2) if len({lengths[i] > 0 for i in b}) > 1]
    assert len(mixed) <= 1  # only where the image leftovers meet the text leftovers, at the end
    megabatches = batches_of(indices, 2 * world_size)
    leftover = sum(len(g) % (2 * world_size) for g in ([l for l in lengths if l > 0], [l for l in lengths if l < 0]))
    for megabatch in megabatches[: (len(indices) - leftover) // (2 * world_size)]:
        assert len({lengths[i] > 0 for i in megabatch}) == 1
    # Same generator seed, same order (every rank draws the same permutation).
    again = LengthGroupedSampler(2, world_size, lengths=lengths, generator=torch.Generator().manual_seed(1),
                                 group_by_modality=True)
    assert list(again) == indices


def test_sampler_groups_by_length_and_needs_lengths():
    lengths = list(range(1, 401))
    indices = list(LengthGroupedSampler(4, lengths=lengths, generator=torch.Generator().manual_seed(0)))
    assert sorted(indices) == list(range(400))
    spread = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches_of(indices, 4)]
    assert sum(spread) / len(spread) < 20  # random batches of 4 out of 1..400 spread by ~240
    only_text = modality_length_grouped_indices([-3, -1, -2, -5], 2, generator=torch.Generator().manual_seed(0))
    assert sorted(only_text) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="needs lengths"):
        LengthGroupedSampler(4)
    with pytest.raises(ValueError, match="modality length of 0"):
        modality_length_grouped_indices([1, 0, -1], 1)




# ---- --cache_samples --------------------------------------------------------------------------------

def test_cache_samples_serves_later_epochs_from_memory(chat_processor, image_folder, tmp_path):
    """With --cache_samples a sample's image is decoded and its text tokenized once: the second epoch gives
    the same tensors even after the image file is gone. Without it the second read goes back to the file."""
    folder = image_folder  # a fresh copy for this test: one of its files is deleted below
    path = write_data(tmp_path / "d.json", [sample("a", "<image>\nWhich digit?", "zero", image="digit0.png"),
                                            sample("b", "Say hi.", "hi")])
    cached = dataset(path, chat_processor, folder, cache_samples=True)
    plain = dataset(path, chat_processor, folder)
    first = [cached[0], cached[1]]
    reference = plain[0]
    (folder / "digit0.png").unlink()
    again = cached[0]
    for key in ("input_ids", "labels", "pixel_values"):
        assert torch.equal(again[key], first[0][key]) and torch.equal(again[key], reference[key])
    assert torch.equal(cached[1]["input_ids"], first[1]["input_ids"])
    assert cached.stats["items"] == 4  # counted per draw, cached or not
    with pytest.raises(DataError, match="digit0.png"):
        plain[0]
