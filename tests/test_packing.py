"""Packed rows (docs/design.md §2.6): several samples in one row, position ids restarting at 0 for each. The
rule applies within each sample, nothing is read across samples, and packing changes no number: each
sample's logits and the loss equal the unpacked batch's on every backend (1e-5, fp32 CPU)."""

import pytest
import torch

from llava_voco.constants import IGNORE_INDEX

from conftest import load_voco, prompt

ATOL = 1e-5


def samples(processor, digit_images):
    """Three samples: one image, two images, text only; each with its labels (every real token learned)."""
    specs = [("Which digit is at the top left?", digit_images[0:1], "seven"),
             ("What is the sum?", digit_images[1:3], "twelve"),
             ("Say hello.", [], "hello")]
    out = []
    for question, images, answer in specs:
        text = prompt(processor, question, len(images), answer=answer)
        encoded = processor(images=images or None, text=text, return_tensors="pt")
        out.append({"input_ids": encoded["input_ids"][0], "pixel_values": encoded.get("pixel_values")})
    return out


def padded_batch(items, pad_id):
    width = max(len(item["input_ids"]) for item in items)
    input_ids = torch.full((len(items), width), pad_id)
    attention_mask = torch.zeros(len(items), width, dtype=torch.long)
    for row, item in enumerate(items):
        input_ids[row, : len(item["input_ids"])] = item["input_ids"]
        attention_mask[row, : len(item["input_ids"])] = 1
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    pixels = [item["pixel_values"] for item in items if item["pixel_values"] is not None]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "pixel_values": torch.cat(pixels)}


def packed_batch(items, pad_id, pad_to: int = 0):
    """One row: the samples one after another, position ids restarting, the first label of each sample
    ignored (no label crosses a sample boundary), right padding to ``pad_to``."""
    input_ids = torch.cat([item["input_ids"] for item in items])
    position_ids = torch.cat([torch.arange(len(item["input_ids"])) for item in items])
    labels = input_ids.clone()
    starts = torch.tensor([0, *[len(item["input_ids"]) for item in items]]).cumsum(0)[:-1]
    labels[starts] = IGNORE_INDEX
    padding = max(pad_to - len(input_ids), 0)
    attention_mask = torch.cat([torch.ones(len(input_ids), dtype=torch.long), torch.zeros(padding, dtype=torch.long)])
    input_ids = torch.cat([input_ids, torch.full((padding,), pad_id)])
    labels = torch.cat([labels, torch.full((padding,), IGNORE_INDEX)])
    position_ids = torch.cat([position_ids, torch.arange(padding)])  # padding restarts too: its own "sample"
    pixels = [item["pixel_values"] for item in items if item["pixel_values"] is not None]
    return {"input_ids": input_ids[None], "attention_mask": attention_mask[None], "labels": labels[None],
            "position_ids": position_ids[None], "pixel_values": torch.cat(pixels)}, starts


@pytest.mark.parametrize("implementation", ["sdpa", "eager", "varlen_reference"])
@pytest.mark.parametrize("mode", ["paper", "official"])
def test_packed_row_gives_the_unpacked_numbers(voco_dir, digit_images, implementation, mode):
    model, processor = load_voco(voco_dir, attn_implementation=implementation, voco_mask_mode=mode)
    pad_id = processor.tokenizer.pad_token_id
    items = samples(processor, digit_images)
    unpacked = padded_batch(items, pad_id)
    packed, starts = packed_batch(items, pad_id, pad_to=sum(len(i["input_ids"]) for i in items) + 3)

    model.train()
    model.zero_grad()
    out_unpacked = model(**unpacked)
    out_unpacked.loss.backward()
    grads_unpacked = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    out_packed = model(**packed)
    out_packed.loss.backward()
    grads_packed = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    for row, (item, start) in enumerate(zip(items, starts.tolist())):
        length = len(item["input_ids"])
        torch.testing.assert_close(out_packed.logits[0, start : start + length], out_unpacked.logits[row, :length],
                                   atol=ATOL, rtol=0)
    # the mean over the same label tokens (the unpacked batch's first labels are never predicted either)
    torch.testing.assert_close(out_packed.loss, out_unpacked.loss, atol=ATOL, rtol=0)
    for name in grads_unpacked:
        torch.testing.assert_close(grads_packed[name], grads_unpacked[name], atol=ATOL, rtol=1e-4, msg=name)


def test_packed_row_without_voco_and_with_flex_forward(llava_dir, voco_dir, digit_images):
    """voco_tokens 0 (plain LLaVA) packs too; flex attention's forward reads the same rule."""
    for path, implementation in ((llava_dir, "sdpa"), (llava_dir, "varlen_reference"), (voco_dir, "flex_attention")):
        model, processor = load_voco(path, attn_implementation=implementation)
        items = samples(processor, digit_images)
        pad_id = processor.tokenizer.pad_token_id
        unpacked = padded_batch(items, pad_id)
        packed, starts = packed_batch(items, pad_id)
        with torch.no_grad():
            logits_unpacked = model(**unpacked).logits
            logits_packed = model(**packed).logits
        for row, (item, start) in enumerate(zip(items, starts.tolist())):
            length = len(item["input_ids"])
            torch.testing.assert_close(logits_packed[0, start : start + length], logits_unpacked[row, :length],
                                       atol=ATOL, rtol=0, msg=f"{path.name} {implementation}")


def test_a_sample_reads_nothing_of_the_one_before(voco_dir, digit_images):
    """Changing the first sample of a packed row changes nothing in the second."""
    model, processor = load_voco(voco_dir)
    items = samples(processor, digit_images)
    pad_id = processor.tokenizer.pad_token_id
    first, starts = packed_batch(items[:2], pad_id)
    other = dict(items[0], pixel_values=processor(images=digit_images[5], text="<image>", return_tensors="pt")["pixel_values"])
    second, _ = packed_batch([other, items[1]], pad_id)
    with torch.no_grad():
        a, b = model(**first).logits, model(**second).logits
    start = int(starts[1])
    assert (a[0, :start] - b[0, :start]).abs().max() > 1e-4  # the first samples differ
    torch.testing.assert_close(a[0, start:], b[0, start:], atol=ATOL, rtol=0)


def test_pack_rows_and_packed_text_batch():
    from llava_voco.train.packing import PackingError, pack_rows, packed_text_batch

    assert pack_rows([3, 4, 2, 5, 1], max_length=7) == [[0, 1], [2, 3], [4]]  # in order, never split
    with pytest.raises(PackingError, match="item 1 of the batch has 9 tokens"):
        pack_rows([3, 9], max_length=8)
    items = [{"input_ids": torch.tensor([1, 5, 6]), "labels": torch.tensor([1, 5, 6])},
             {"input_ids": torch.tensor([1, 7]), "labels": torch.tensor([IGNORE_INDEX, 7])},
             {"input_ids": torch.tensor([1, 8, 9, 4]), "labels": torch.tensor([1, 8, 9, 4])}]
    batch = packed_text_batch(items, max_length=6, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 1, 7], [1, 8, 9, 4, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 5, 6, IGNORE_INDEX, 7], [IGNORE_INDEX, 8, 9, 4, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
