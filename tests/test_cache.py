"""VoCoCache: compress once, answer many (docs/design.md §2.3 equivalence 1), persistence and refusals."""

import pytest
import torch

from llava_voco import VoCoCache, VoCoCacheError, VoCoLlavaForConditionalGeneration, model_fingerprint

from conftest import load_voco, prompt

LOGIT_ATOL = 1e-5  # float32, CPU: the cached and full paths differ only by summation order


def split_prompt(processor, question, images=1, answer=None):
    """(text up to the last image placeholder, the rest): compress the first, ask with the second."""
    text = prompt(processor, question, images, answer)
    cut = text.rindex("<image>") + len("<image>")
    return text, text[:cut], text[cut:]


def tokenize_text(processor, texts, padding_side="left"):
    processor.tokenizer.padding_side = padding_side
    return processor.tokenizer(texts, add_special_tokens=False, return_tensors="pt", padding=True)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("mode", ["paper", "official"])
def test_answer_logits_and_greedy_equal_full_forward(voco_dir, digit_images, implementation, mode):
    model, processor = load_voco(voco_dir, attn_implementation=implementation, voco_mask_mode=mode)
    full_text, head_text, question = split_prompt(processor, "Which digit is at the top left?")
    full = processor(images=digit_images[3], text=full_text, return_tensors="pt")
    head = processor(images=digit_images[3], text=head_text, return_tensors="pt")
    question_ids = tokenize_text(processor, [question])
    assert torch.equal(torch.cat([head.input_ids, question_ids.input_ids], 1), full.input_ids)

    cache = model.compress(**head)
    vision = int((head.input_ids == model.config.image_token_id).sum())
    # prefix + k in both modes: in official mode text may not read the prefix (the mask hides it), but an image
    # compressed later may, so the cache keeps it (test_continuing_a_cache_equals_the_full_forward)
    expected_cached = head.input_ids.shape[1] - vision
    assert cache.get_seq_length() == expected_cached
    assert int(cache.next_position) == head.input_ids.shape[1]
    with torch.no_grad():
        reference = model(**full).logits[:, head.input_ids.shape[1] :]
        from_cache = model(**question_ids, past_key_values=cache.clone()).logits
    torch.testing.assert_close(from_cache, reference, atol=LOGIT_ATOL, rtol=0)

    greedy_full = model.generate(**full, max_new_tokens=8, do_sample=False)
    greedy_cache = model.generate(**question_ids, past_key_values=cache, max_new_tokens=8, do_sample=False,
                                  output_scores=True, return_dict_in_generate=True)
    assert torch.equal(greedy_cache.sequences[:, question_ids.input_ids.shape[1] :], greedy_full[:, full.input_ids.shape[1] :])
    assert cache.get_seq_length() == expected_cached  # answering did not touch the cache


def test_the_offset_is_needed(voco_dir, digit_images):
    """Dropping the vision positions without keeping the text's original positions changes the logits,
    so the equivalence above can fail."""
    model, processor = load_voco(voco_dir)
    full_text, head_text, question = split_prompt(processor, "What is the sum?")
    head = processor(images=digit_images[5], text=head_text, return_tensors="pt")
    question_ids = tokenize_text(processor, [question])
    cache = model.compress(**head)
    without_offset = cache.clone()
    without_offset.next_position = torch.tensor([cache.get_seq_length()])
    with torch.no_grad():
        right = model(**question_ids, past_key_values=cache.clone()).logits
        wrong = model(**question_ids, past_key_values=without_offset).logits
    assert (right - wrong).abs().max() > 1e-3


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_several_images_compressed_one_after_another(voco_dir, digit_images, implementation):
    model, processor = load_voco(voco_dir, attn_implementation=implementation)
    full_text, head_text, question = split_prompt(processor, "Which digit is at the top left?", images=3)
    images = digit_images[6:9]
    full = processor(images=images, text=full_text, return_tensors="pt")
    head = processor(images=images, text=head_text, return_tensors="pt")
    question_ids = tokenize_text(processor, [question])
    vision_per_image = int((head.input_ids == model.config.image_token_id).sum()) // 3

    seen_cache_lengths = []
    hook = model.model.language_model.register_forward_hook(
        lambda module, args, kwargs, output: seen_cache_lengths.append(kwargs["past_key_values"].get_seq_length()),
        with_kwargs=True,
    )
    try:
        cache = model.compress(**head)
    finally:
        hook.remove()
    voco_positions = (head.input_ids[0] == model.config.voco_token_id).nonzero().squeeze(1)
    assert len(seen_cache_lengths) == 3  # one prefill per image
    for image, length in enumerate(seen_cache_lengths):
        # right after image i's prefill: everything up to its VoCo token, minus the earlier images' vision
        assert length == int(voco_positions[image]) + 1 - image * vision_per_image, seen_cache_lengths
    assert cache.get_seq_length() == head.input_ids.shape[1] - 3 * vision_per_image
    assert cache.num_images.tolist() == [3]
    with torch.no_grad():
        reference = model(**full).logits[:, head.input_ids.shape[1] :]
        from_cache = model(**question_ids, past_key_values=cache.clone()).logits
    torch.testing.assert_close(from_cache, reference, atol=LOGIT_ATOL, rtol=0)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_batches_of_questions_and_of_caches(voco_dir, digit_images, implementation):
    model, processor = load_voco(voco_dir, attn_implementation=implementation)
    questions = ["Which digit is at the top left?", "What is the largest digit? Describe the picture."]
    texts = [split_prompt(processor, q) for q in questions]
    single = {}
    for i, image in enumerate(digit_images[10:12]):
        head = processor(images=image, text=texts[0][1], return_tensors="pt")
        cache = model.compress(**head)
        for j, (_, _, question) in enumerate(texts):
            question_ids = tokenize_text(processor, [question])
            out = model.generate(**question_ids, past_key_values=cache, max_new_tokens=5, do_sample=False)
            single[i, j] = out[0, question_ids.input_ids.shape[1] :]

    # several questions about one image: one cache row, a padded batch of questions
    head = processor(images=digit_images[10], text=texts[0][1], return_tensors="pt")
    cache = model.compress(**head)
    batch = tokenize_text(processor, [t[2] for t in texts], padding_side="left")
    out = model.generate(**batch, past_key_values=cache, max_new_tokens=5, do_sample=False)
    for j in range(2):
        assert torch.equal(out[j, batch.input_ids.shape[1] :], single[0, j])
    assert cache.batch_size == 1 and cache.get_seq_length() == cache.described_length

    # different caches, batched: rows of different prompt lengths (left padded inside the cache)
    long_head = processor(images=digit_images[11], text="Describe the picture. " + texts[0][1], return_tensors="pt")
    caches = [model.compress(**head), model.compress(**long_head)]
    mixed = VoCoCache.concatenate(caches)
    assert mixed.batch_size == 2 and int(mixed.attention_mask[0].sum()) < mixed.described_length
    question_batch = tokenize_text(processor, [texts[0][2], texts[1][2]])
    out = model.generate(**question_batch, past_key_values=mixed, max_new_tokens=5, do_sample=False)
    with torch.no_grad():
        for row, cache in enumerate(caches):
            alone = tokenize_text(processor, [texts[row][2]])
            expected = model.generate(**alone, past_key_values=cache, max_new_tokens=5, do_sample=False)
            assert torch.equal(out[row, question_batch.input_ids.shape[1] :], expected[0, alone.input_ids.shape[1] :])

    # batched compress gives the same batched cache as compressing one at a time
    processor.tokenizer.padding_side = "left"
    both = processor(images=[digit_images[10], digit_images[11]], text=[texts[0][1], "Describe the picture. " + texts[0][1]],
                     return_tensors="pt", padding=True)
    batched = model.compress(**both)
    assert torch.equal(batched.attention_mask, mixed.attention_mask)
    for ours, theirs in zip(batched.layers, mixed.layers):
        torch.testing.assert_close(ours.keys, theirs.keys, atol=LOGIT_ATOL, rtol=0)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_multi_turn_keeps_the_turn(voco_dir, digit_images, implementation):
    model, processor = load_voco(voco_dir, attn_implementation=implementation)
    _, head_text, question1 = split_prompt(processor, "Which digit is at the top left?")
    head = processor(images=digit_images[13], text=head_text, return_tensors="pt")
    cache = model.compress(**head)
    q1 = tokenize_text(processor, [question1])
    turn1 = model.generate(**q1, past_key_values=cache, keep_turn=True, max_new_tokens=4, do_sample=False)
    assert cache.described_length == cache.get_seq_length() > 0
    q2 = tokenize_text(processor, [" USER: What is the sum? ASSISTANT:"])
    turn2 = model.generate(**q2, past_key_values=cache, max_new_tokens=4, do_sample=False)

    conversation = torch.cat([head.input_ids, turn1, q2.input_ids], dim=1)
    full = model.generate(input_ids=conversation, pixel_values=head.pixel_values, max_new_tokens=4, do_sample=False)
    assert torch.equal(turn2[:, q2.input_ids.shape[1] :], full[:, conversation.shape[1] :])


def test_sampling_and_stop_strings(voco_dir, digit_images):
    model, processor = load_voco(voco_dir)
    _, head_text, question = split_prompt(processor, "What is the sum?")
    cache = model.compress(**processor(images=digit_images[14], text=head_text, return_tensors="pt"))
    q = tokenize_text(processor, [question])
    torch.manual_seed(1)
    first = model.generate(**q, past_key_values=cache, do_sample=True, temperature=1.0, max_new_tokens=6)
    torch.manual_seed(1)
    second = model.generate(**q, past_key_values=cache, do_sample=True, temperature=1.0, max_new_tokens=6)
    assert torch.equal(first, second) and first.shape[1] == q.input_ids.shape[1] + 6
    greedy = model.generate(**q, past_key_values=cache, max_new_tokens=6, do_sample=False)
    stop = processor.tokenizer.decode(greedy[0, q.input_ids.shape[1] + 1 : q.input_ids.shape[1] + 2])
    stopped = model.generate(**q, past_key_values=cache, max_new_tokens=6, do_sample=False,
                             stop_strings=[stop], tokenizer=processor.tokenizer)
    assert stopped.shape[1] < greedy.shape[1]


def test_save_load_and_refusals(voco_dir, digit_images, tmp_path):
    model, processor = load_voco(voco_dir)
    _, head_text, question = split_prompt(processor, "What is the sum?")
    cache = model.compress(**processor(images=digit_images[15], text=head_text, return_tensors="pt"))
    path = tmp_path / "image.voco.safetensors"
    cache.save(path)
    loaded = VoCoCache.load(path, model)
    for ours, theirs in zip(loaded.layers, cache.layers):
        assert torch.equal(ours.keys, theirs.keys) and torch.equal(ours.values, theirs.values)
    assert torch.equal(loaded.next_position, cache.next_position) and loaded.fingerprint == cache.fingerprint
    q = tokenize_text(processor, [question])
    assert torch.equal(model.generate(**q, past_key_values=loaded, max_new_tokens=4, do_sample=False),
                       model.generate(**q, past_key_values=cache, max_new_tokens=4, do_sample=False))

    other = VoCoLlavaForConditionalGeneration.from_pretrained(voco_dir).eval()
    with torch.no_grad():
        other.lm_head.weight[0, 0] += 1.0
    assert model_fingerprint(other) != model_fingerprint(model)
    with pytest.raises(VoCoCacheError, match="another model or config"):
        VoCoCache.load(path, other)
    other_config = VoCoLlavaForConditionalGeneration.from_pretrained(voco_dir, voco_tokens=2).eval()
    with pytest.raises(VoCoCacheError, match="another model or config"):
        VoCoCache.load(path, other_config)

    data = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(VoCoCacheError, match="truncated or corrupt"):
        VoCoCache.load(truncated, model)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(data[:-8] + bytes(b ^ 0xFF for b in data[-8:]))
    with pytest.raises(VoCoCacheError, match="corrupt"):
        VoCoCache.load(corrupt, model)

    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        metadata = dict(handle.metadata())
    future = tmp_path / "future.safetensors"
    save_file(load_file(path), future, metadata={**metadata, "format_version": "99"})
    with pytest.raises(VoCoCacheError, match="format version '99'"):
        VoCoCache.load(future, model)


@pytest.mark.parametrize("mode", ["paper", "official"])
@pytest.mark.parametrize("cached_images", [1, 2, 3])
@pytest.mark.parametrize("continuation_has_image", [False, True])
def test_continuing_a_cache_equals_the_full_forward(voco_dir, digit_images, mode, cached_images, continuation_has_image):
    """Compress the first images, then continue in one call with (maybe) another image plus text: the
    continuation's logits equal those of the full masked forward, in both modes. (Official mode used to move
    the first VoCo token past the cache, so text after a new image lost the earlier images' VoCo tokens.)"""
    model, processor = load_voco(voco_dir, voco_mask_mode=mode)
    images_in_total = cached_images + int(continuation_has_image)
    text = prompt(processor, "Which digit is at the top left?", images=images_in_total)
    images = digit_images[10 : 10 + images_in_total]
    full = processor(images=images, text=text, return_tensors="pt")
    # cut after the last cached image's placeholder, in the processor's expanded token sequence
    is_block = (full.input_ids[0] == model.config.image_token_id) | (full.input_ids[0] == model.config.voco_token_id)
    block_ends = (is_block[:-1] & ~is_block[1:]).nonzero().flatten() + 1
    cut = int(block_ends[cached_images - 1])
    head = {"input_ids": full.input_ids[:, :cut], "pixel_values": full.pixel_values[:cached_images]}
    cache = model.compress(**head)
    continuation = {"input_ids": full.input_ids[:, cut:]}
    if continuation_has_image:
        continuation["pixel_values"] = full.pixel_values[cached_images:]
    with torch.no_grad():
        reference = model(**full).logits[:, cut:]
        from_cache = model(**continuation, past_key_values=cache.clone()).logits
    torch.testing.assert_close(from_cache, reference, atol=LOGIT_ATOL, rtol=0)
    # and greedy answers from the cache equal the full prompt's
    greedy_full = model.generate(**full, max_new_tokens=5, do_sample=False)
    greedy_cache = model.generate(**continuation, past_key_values=cache, max_new_tokens=5, do_sample=False)
    assert torch.equal(greedy_cache[:, continuation["input_ids"].shape[1]:], greedy_full[:, full.input_ids.shape[1]:])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_half_precision_caches(voco_dir, digit_images, tmp_path, dtype, implementation):
    """bf16 / fp16: the eager mask's fill value is the dtype's, the cache saves and loads bit-exact with its
    fingerprint and checksum, and answering from it matches the full masked forward (half tolerance)."""
    model, processor = load_voco(voco_dir, attn_implementation=implementation, dtype=dtype)
    assert all(p.dtype == dtype for p in model.parameters())
    full_text, head_text, question = split_prompt(processor, "Which digit is at the top left?")
    full = processor(images=digit_images[2], text=full_text, return_tensors="pt")
    head = processor(images=digit_images[2], text=head_text, return_tensors="pt")
    full["pixel_values"], head["pixel_values"] = full["pixel_values"].to(dtype), head["pixel_values"].to(dtype)
    question_ids = tokenize_text(processor, [question])
    cache = model.compress(**head)
    assert cache.layers[0].keys.dtype == dtype
    cache.save(tmp_path / "half.safetensors")
    loaded = VoCoCache.load(tmp_path / "half.safetensors", model)
    for mine, theirs in zip(cache.layers, loaded.layers):
        assert theirs.keys.dtype == dtype
        assert torch.equal(mine.keys.view(torch.int16), theirs.keys.view(torch.int16))  # bit-exact
        assert torch.equal(mine.values.view(torch.int16), theirs.values.view(torch.int16))
    with torch.no_grad():
        reference = model(**full).logits[:, head.input_ids.shape[1]:].float()
        from_cache = model(**question_ids, past_key_values=loaded.clone()).logits.float()
    assert torch.isfinite(from_cache).all()
    assert (from_cache - reference).abs().max() <= 2e-2 * reference.abs().max()
    answer = model.generate(**question_ids, past_key_values=loaded, max_new_tokens=4, do_sample=False)
    assert answer.shape[1] == question_ids.input_ids.shape[1] + 4


def test_keep_turn_without_an_end_of_sequence_id(voco_dir, digit_images):
    """A model whose tokenizer has no end-of-sequence id: the kept turn holds every generated token (keep_turn
    built ``torch.tensor([None])`` and failed)."""
    model, processor = load_voco(voco_dir)
    model.generation_config.eos_token_id = None
    text = prompt(processor, "What is the sum?")
    head = text[: text.index("<image>") + len("<image>")]
    cache = model.compress(**processor(images=digit_images[0], text=head, return_tensors="pt"))
    question = torch.tensor([processor.tokenizer(text)["input_ids"][len(processor.tokenizer(head)["input_ids"]):]])
    before = cache.described_length
    output = model.generate(input_ids=question, past_key_values=cache, keep_turn=True, max_new_tokens=3,
                            do_sample=False, pad_token_id=0)
    assert output.shape[1] == question.shape[1] + 3
    assert cache.described_length == before + question.shape[1] + 3 == cache.get_seq_length()
    assert cache.token_ids[0, before:].tolist() == output[0].tolist()


def test_truncate_cuts_a_kept_conversation_back_to_its_head(voco_dir, digit_images):
    """``truncate`` keeps the first positions and moves where text resumes back with them: a conversation's
    cache cut back to its head answers as the head's own cache does."""
    model, processor = load_voco(voco_dir)
    text, head, _ = split_prompt(processor, "What is the sum?")
    cache = model.compress(**processor(images=digit_images[1], text=head, return_tensors="pt"))
    question = torch.tensor([processor.tokenizer(text)["input_ids"][len(processor.tokenizer(head)["input_ids"]):]])
    kept = cache.clone()
    model.generate(input_ids=question, past_key_values=kept, keep_turn=True, max_new_tokens=3, do_sample=False)
    assert kept.described_length > cache.described_length
    cut = kept.truncate(cache.described_length)
    assert torch.equal(cut.token_ids, cache.token_ids) and torch.equal(cut.next_position, cache.next_position)
    for ours, theirs in zip(cut.layers, cache.layers):
        assert torch.equal(ours.keys, theirs.keys) and torch.equal(ours.values, theirs.values)
    greedy = {"max_new_tokens": 4, "do_sample": False}
    assert torch.equal(model.generate(input_ids=question, past_key_values=cut, **greedy),
                       model.generate(input_ids=question, past_key_values=cache, **greedy))
    assert kept.described_length > cut.described_length  # a copy: the conversation's cache is as it was
    with pytest.raises(VoCoCacheError, match="cannot truncate"):
        cache.truncate(cache.described_length + 1)
