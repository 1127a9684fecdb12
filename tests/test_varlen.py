"""The VoCo mask as varlen segments (docs/design.md §2.5): the plan against the dense rule, and the
``varlen_reference`` backend against sdpa (logits and gradients, 1e-5, fp32 CPU) on every layout."""

import pytest
import torch

import llava_voco
from llava_voco import VoCoCache, VoCoLayout
from llava_voco.model.attention import AttentionBackendUnavailable
from llava_voco.model.varlen import build_varlen_plan, varlen_reference_attention

from conftest import load_voco, prompt

ATOL = 1e-5
IMG, VOCO = 9, 8


def plan_as_dense(plan) -> torch.Tensor:
    """``[batch, q_length, kv_length]``: which keys each query reads under the plan."""
    allowed = torch.zeros(plan.batch_size * plan.q_length, plan.batch_size * plan.kv_length, dtype=torch.bool)
    bounds_q, bounds_k = plan.cu_seqlens_q.tolist(), plan.cu_seqlens_k.tolist()
    for s in range(plan.num_segments):
        queries = plan.query_index[bounds_q[s] : bounds_q[s + 1]]
        keys = plan.key_index[bounds_k[s] : bounds_k[s + 1]]
        shift = len(keys) - len(queries)
        for i, query in enumerate(queries.tolist()):
            allowed[query, keys[: i + shift + 1]] = True
    per_row = allowed.view(plan.batch_size, plan.q_length, plan.batch_size, plan.kv_length)
    return torch.stack([per_row[b, :, b] for b in range(plan.batch_size)])


@pytest.mark.parametrize("mode", ["paper", "official"])
@pytest.mark.parametrize("voco_tokens", [1, 2])
def test_plan_reads_exactly_what_the_rule_allows(mode, voco_tokens):
    rows = [
        [1, 2] + [IMG] * 3 + [VOCO] * voco_tokens + [5, 6, 7, 0],
        [0, 1] + [IMG] * 2 + [VOCO] * voco_tokens + [4] + [IMG] * 2 + [VOCO] * voco_tokens + [6],
        [1, 2, 3, 4, 5, 6, 0, 0],
        [1] + [IMG] * 2 + [VOCO] * voco_tokens + [IMG] * 2 + [VOCO] * voco_tokens + [IMG] * 2 + [VOCO] * voco_tokens + [3],
    ]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[0 if (t == 0) else 1 for t in r] + [0] * (width - len(r)) for r in rows])
    layout = VoCoLayout.from_input_ids(ids, mask, image_token_id=IMG, voco_token_id=VOCO, voco_tokens=voco_tokens, mode=mode)
    for q_offset in (0, 3, width - 1):  # a prefill, a continuation after some cached positions, a decoding step
        plan = build_varlen_plan(layout, mask, batch_size=len(rows), q_offset=q_offset, q_length=width - q_offset)
        expected = layout.dense_mask(mask, q_offset=q_offset, q_length=width - q_offset)[:, 0]
        real_queries = mask[:, q_offset:].bool()[:, :, None]
        assert torch.equal(plan_as_dense(plan), expected & real_queries), (mode, q_offset)


@pytest.mark.parametrize("mode", ["paper", "official"])
def test_plan_of_packed_rows_reads_within_each_sample(mode):
    """Two samples per row (position ids restart): the plan equals the dense rule, which never crosses them."""
    from llava_voco.model.voco_mask import packed_sample_index

    samples = [[1, 2, IMG, IMG, VOCO, 5, 6], [1, IMG, IMG, VOCO, 4, IMG, VOCO, 7], [1, 3, 4]]
    rows = [samples[0] + samples[1], samples[2] + samples[0] + [0, 0, 0, 0, 0]]
    positions = [list(range(7)) + list(range(8)), list(range(3)) + list(range(7)) + list(range(5))]
    ids, position_ids = torch.tensor(rows), torch.tensor(positions)
    mask = torch.tensor([[1] * 15, [1] * 10 + [0] * 5])
    sample_index = packed_sample_index(position_ids)
    assert sample_index[0].tolist() == [0] * 7 + [1] * 8
    layout = VoCoLayout.from_input_ids(ids, mask, image_token_id=IMG, voco_token_id=VOCO, voco_tokens=1, mode=mode,
                                       sample_index=sample_index)
    expected = layout.dense_mask(mask)[:, 0]
    assert not expected[0, 7:, :7].any()  # the second sample reads nothing of the first
    plan = build_varlen_plan(layout, mask, batch_size=2, q_offset=0, q_length=15)
    assert torch.equal(plan_as_dense(plan), expected & mask.bool()[:, :, None])


def test_reference_kernel_is_bottom_right_causal_with_gqa():
    torch.manual_seed(0)
    q, k, v = torch.randn(5, 4, 8), torch.randn(9, 2, 8), torch.randn(9, 2, 8)
    cu_q, cu_k = torch.tensor([0, 2, 5], dtype=torch.int32), torch.tensor([0, 4, 9], dtype=torch.int32)
    out = varlen_reference_attention(q, k, v, cu_q, cu_k, 3, 5, softmax_scale=0.5, causal=True)
    # sequence 2: 3 queries over 5 keys; query i reads keys 0 .. i + 2
    keys, values = k[4:9].repeat_interleave(2, dim=1), v[4:9].repeat_interleave(2, dim=1)
    for i in range(3):
        scores = torch.einsum("hd,khd->hk", q[2 + i], keys[: i + 3]) * 0.5
        expected = torch.einsum("hk,khd->hd", scores.softmax(-1), values[: i + 3])
        torch.testing.assert_close(out[2 + i], expected, atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def voco4_dir(llava_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_voco4")
    llava_voco.add_voco_to_llava(llava_dir, voco_tokens=4, output_dir=path)
    return path


def batch_for(processor, digit_images, images_per_row, padding_side):
    texts = [prompt(processor, "Which digit is at the top left?", n, answer="seven") for n in images_per_row]
    images = [image for n, row in zip(images_per_row, range(9)) for image in digit_images[row : row + n]]
    processor.tokenizer.padding_side = padding_side
    batch = processor(images=images or None, text=texts, return_tensors="pt", padding=True)
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return batch


def logits_and_grads(model, batch):
    model.zero_grad()
    out = model(**batch)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    real = batch["attention_mask"].bool()
    return out.logits[real].detach(), out.loss.detach(), grads


@pytest.mark.parametrize("mode", ["paper", "official"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("voco_k", [1, 4])
def test_varlen_reference_equals_sdpa(voco_dir, voco4_dir, digit_images, mode, padding_side, voco_k):
    """1 and 3 images and a text-only row in one batch, GQA (4 heads over 2 key/value heads)."""
    path = voco_dir if voco_k == 1 else voco4_dir
    reference, processor = load_voco(path, attn_implementation="sdpa", voco_mask_mode=mode)
    varlen, _ = load_voco(path, attn_implementation="varlen_reference", voco_mask_mode=mode)
    assert varlen.config.text_config.num_key_value_heads < varlen.config.text_config.num_attention_heads
    assert varlen.model.language_model.config._attn_implementation == "varlen_reference"
    batch = batch_for(processor, digit_images, [1, 3, 0], padding_side)
    expected = logits_and_grads(reference.train(), batch)
    got = logits_and_grads(varlen.train(), batch)
    # the same backend with plain causal segments: the rule was in the plan
    without_rule = logits_and_grads(varlen, {**batch, "voco_mask": False})
    assert (without_rule[0] - expected[0]).abs().max() > 1e-3
    torch.testing.assert_close(got[0], expected[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(got[1], expected[1], atol=ATOL, rtol=0)
    assert got[2].keys() == expected[2].keys()
    for name in expected[2]:
        torch.testing.assert_close(got[2][name], expected[2][name], atol=ATOL, rtol=1e-4, msg=name)


def test_varlen_reference_video_sample_and_plain_llava(voco_dir, llava_dir, digit_images):
    reference, processor = load_voco(voco_dir)
    varlen, _ = load_voco(voco_dir, attn_implementation="varlen_reference")
    batch = processor(videos=[digit_images[:4]], text=["USER: <video>\nWhich frame shows 3? ASSISTANT: two"],
                      return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(varlen(**batch).logits, reference(**batch).logits, atol=ATOL, rtol=0)
    # voco_tokens 0: plain causal attention, padding-free
    plain, plain_processor = load_voco(llava_dir, attn_implementation="varlen_reference")
    sdpa, _ = load_voco(llava_dir)
    batch = batch_for(plain_processor, digit_images, [1, 0], "left")
    with torch.no_grad():
        real = batch["attention_mask"].bool()
        torch.testing.assert_close(plain(**batch).logits[real], sdpa(**batch).logits[real], atol=ATOL, rtol=0)


@pytest.mark.parametrize("mode", ["paper", "official"])
def test_varlen_reference_compress_and_answer_from_the_cache(voco_dir, digit_images, mode):
    """The cached path (continuation after a compressed image, then decoding) on the varlen backend."""
    reference, processor = load_voco(voco_dir, voco_mask_mode=mode)
    varlen, _ = load_voco(voco_dir, attn_implementation="varlen_reference", voco_mask_mode=mode)
    text = prompt(processor, "What is the sum?", 2)
    full = processor(images=digit_images[3:5], text=text, return_tensors="pt")
    cut = int((full.input_ids[0] == varlen.config.voco_token_id).nonzero()[0]) + 1  # after the first image's VoCo
    head = {"input_ids": full.input_ids[:, :cut], "pixel_values": full.pixel_values[:1]}
    rest = {"input_ids": full.input_ids[:, cut:], "pixel_values": full.pixel_values[1:]}
    cache = varlen.compress(**head)
    assert isinstance(cache, VoCoCache)
    with torch.no_grad():
        expected = reference(**full).logits[:, cut:]
        got = varlen(**rest, past_key_values=cache.clone()).logits
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    greedy = reference.generate(**full, max_new_tokens=6, do_sample=False)[:, full.input_ids.shape[1]:]
    from_cache = varlen.generate(**rest, past_key_values=cache, max_new_tokens=6, do_sample=False)
    assert torch.equal(from_cache[:, rest["input_ids"].shape[1]:], greedy)


def test_flash_attention_2_without_flash_attn_is_refused_before_loading(voco_dir, tmp_path):
    """flash-attn is not installable here: the request is refused by name, before any weight is read (the
    weights file is replaced by garbage to prove it)."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(voco_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not weights")
    with pytest.raises(AttentionBackendUnavailable, match=r"llava-voco\[gpu\]"):
        llava_voco.VoCoLlavaForConditionalGeneration.from_pretrained(broken, attn_implementation="flash_attention_2")


def test_flex_block_mask_skips_text_to_vision_blocks(voco_dir):
    """Flex attention (the GPU training path, where its backward exists) gets the rule as a BlockMask whose
    block sparsity skips every block of text queries over closed vision keys: they are never computed."""
    model, _ = load_voco(voco_dir, attn_implementation="flex_attention")
    config = model.config
    block = 128
    ids = torch.tensor([[1] + [config.image_token_id] * 4 * block + [config.voco_token_id] + [5] * 3 * block])
    layout = model.model.voco_layout(ids)
    block_mask, _, _ = model.model.prepare_attention(ids, None, None, None, layout, None, batch_size=1,
                                                     query_length=ids.shape[1], device=ids.device)
    computed = block_mask.to_dense()[0, 0]  # [query blocks, key blocks]: 1 where a block is computed
    text_start = int(layout.text_start[0, 0])
    text_query_blocks = [b for b in range(computed.shape[0]) if b * block >= text_start]
    vision_key_blocks = [b for b in range(computed.shape[1]) if 1 <= b * block and (b + 1) * block <= 4 * block]
    assert text_query_blocks and vision_key_blocks
    for q in text_query_blocks:
        assert computed[q, vision_key_blocks].sum() == 0
        assert computed[q, 0] == 1  # the block holding the prefix (and the first vision tokens) is read
    # the block holding the VoCo token still reads every vision block: that is where the compression happens
    voco_block = (text_start - 1) // block
    assert voco_block not in text_query_blocks and computed[voco_block, vision_key_blocks].all()
