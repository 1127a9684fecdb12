"""``--packing True`` through the training entry (docs/design.md §2.6): each batch's samples laid one after
another in rows of at most ``--model_max_length`` tokens, position ids restarting at each sample. From the
same seed a packed run logs the losses of the padded run (1e-5 per step, fp32) and the same data counters,
with ``--group_by_modality_length``, skipped and cut samples in the data, VoCo on or off; the varlen backend
trains packed rows too; the ZeRO-3 blank-image row keeps a packed batch's loss."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from llava_voco.constants import IGNORE_INDEX
from llava_voco.train.collator import DataCollatorForSupervisedDataset
from llava_voco.train.train import main
from llava_voco.train.trainer import with_blank_image_row

from test_train import WORDS, common_args, digit_samples, layout_a, tiny  # noqa: F401

MAX_LENGTH = 200  # about two of these samples per packed row
COUNTERS = ("samples_skipped", "samples_truncated", "replies_dropped", "vision_tokens_per_sample",
            "voco_tokens_per_sample", "image_token_share", "compression_ratio")


@pytest.fixture(scope="module")
def packing_data(tiny, tmp_path_factory):
    """16 samples, one epoch of 4 batches of 4 with --group_by_modality_length (3 image batches, 1 text-only):
    10 image samples, one whose image is missing (skipped: --skip_bad_samples), one too long for
    MAX_LENGTH (cut, its cut reply not learned), 4 text-only."""
    samples = digit_samples(tiny.targets[:10], text_only=4)
    samples.insert(3, {"id": "missing", "image": "digits/nope.png",
                       "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "one"}]})
    samples.insert(7, {"id": "long", "image": "digits/11.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is in the image?"}, {"from": "gpt", "value": WORDS[1]},
        {"from": "human", "value": "Describe the image."}, {"from": "gpt", "value": " ".join(WORDS * 20)}]})
    path = tmp_path_factory.mktemp("packing") / "data.json"
    path.write_text(json.dumps(samples))
    return path


def run(tiny, data, output_dir, *extra):
    args = [str(a) for a in extra] + ["--skip_bad_samples", "True", "--check_samples", "False",  # skipped when drawn
                                      "--group_by_modality_length", "True"]
    return main(args + common_args(tiny, output_dir, data_path=data, num_train_epochs=1, save_strategy="no",
                                   model_max_length=MAX_LENGTH))


def logged(trainer) -> dict[int, dict]:
    return {entry["step"]: entry for entry in trainer.state.log_history if "loss" in entry}


@pytest.mark.parametrize("voco", [["--voco_tokens", "1"], []], ids=["voco1", "voco0"])
def test_packed_run_logs_the_padded_runs_losses_and_counters(tiny, packing_data, tmp_path, voco, caplog):
    caplog.set_level(logging.INFO, logger="llava_voco.train")
    padded = run(tiny, packing_data, tmp_path / "padded", *layout_a(tiny), *voco)
    packed = run(tiny, packing_data, tmp_path / "packed", *layout_a(tiny), *voco, "--packing", "True")
    assert "packing: each batch's samples in rows of at most 200 tokens" in caplog.text

    # what the packed run's collator makes: rows of whole samples, position ids restarting at each
    batches = list(packed.get_train_dataloader())
    assert all("position_ids" in b for b in batches)
    assert sum(b["num_samples"] for b in batches) == 15 and sum(b["num_samples_skipped"] for b in batches) == 1
    assert sum(b["input_ids"].shape[0] for b in batches) < 15  # fewer rows than samples: they were packed
    for batch in batches:
        assert batch["input_ids"].shape[1] <= MAX_LENGTH
        starts = (batch["position_ids"] == 0) & (batch["attention_mask"] == 1)
        assert int(starts.sum()) == batch["num_samples"]
        assert (batch["labels"][starts] == IGNORE_INDEX).all()  # no label predicted across a boundary

    padded_log, packed_log = logged(padded), logged(packed)
    assert sorted(padded_log) == sorted(packed_log) == [1, 2, 3, 4]
    for step in padded_log:
        assert packed_log[step]["loss"] == pytest.approx(padded_log[step]["loss"], abs=1e-5), step
        assert packed_log[step]["grad_norm"] == pytest.approx(padded_log[step]["grad_norm"], rel=1e-4), step
        for counter in COUNTERS:
            assert packed_log[step].get(counter) == padded_log[step].get(counter), (step, counter)
    last = packed_log[4]
    assert (last["samples_skipped"], last["samples_truncated"]) == (1, 1)


def test_varlen_backend_trains_packed_rows(tiny, packing_data, tmp_path, caplog):
    """--attn_implementation varlen_reference --packing True: the VoCo rule and the sample boundaries as varlen
    segments, nothing padded computed; the losses are sdpa's padded ones (measured: equal to 5e-7)."""
    caplog.set_level(logging.INFO, logger="llava_voco.train")
    voco = [*layout_a(tiny), "--voco_tokens", "1"]
    varlen = run(tiny, packing_data, tmp_path / "varlen", *voco, "--packing", "True",
                 "--attn_implementation", "varlen_reference")
    assert "attention: language model varlen_reference (VoCo rule as a varlen segment plan" in caplog.text
    assert "vision tower sdpa" in caplog.text
    padded = run(tiny, packing_data, tmp_path / "padded", *voco)
    varlen_log, padded_log = logged(varlen), logged(padded)
    assert sorted(varlen_log) == [1, 2, 3, 4]
    for step in padded_log:
        assert varlen_log[step]["loss"] == pytest.approx(padded_log[step]["loss"], abs=1e-5), step


@pytest.mark.parametrize("attn", ["sdpa", "varlen_reference"])
def test_zero3_blank_image_row_beside_packed_rows(voco_dir, digit_images, attn):
    """Under ZeRO-3 a text-only batch gets a blank-image row; beside packed rows it is a sample of its own
    (position ids from 0): the vision path runs and the loss is the packed rows' own."""
    from conftest import load_voco, prompt

    model, processor = load_voco(voco_dir, attn_implementation=attn)
    items = []
    for question, answer in (("Say hello.", "hello"), ("Say a word.", "seven"), ("Count to two.", "one two")):
        ids = processor(text=prompt(processor, question, images=0, answer=answer), return_tensors="pt")["input_ids"][0]
        items.append({"input_ids": ids, "labels": ids.clone()})
    longest = max(len(i["input_ids"]) for i in items)
    collate = DataCollatorForSupervisedDataset(tokenizer=processor.tokenizer, label_pad_token_id=IGNORE_INDEX,
                                               packed_row_length=2 * longest)
    batch = collate(items)
    for key in ("num_samples", "num_vision_tokens", "num_voco_tokens", "num_samples_skipped",
                "num_samples_truncated", "num_replies_dropped"):
        batch.pop(key)
    assert batch["input_ids"].shape[0] == 2 and "pixel_values" not in batch
    inputs = with_blank_image_row(batch, model, processor)
    assert inputs["position_ids"].shape == inputs["input_ids"].shape
    blank_length = int((inputs["input_ids"][-1] != processor.tokenizer.pad_token_id).sum())
    assert inputs["position_ids"][-1, :blank_length].tolist() == list(range(blank_length))
    torch.testing.assert_close(inputs["position_ids"][:, : batch["position_ids"].shape[1]][:-1], batch["position_ids"])
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).loss, model(**batch).loss, atol=1e-5, rtol=0)
