"""Can a VoCo cache enter an engine that only knows contiguous positions (vLLM / SGLang paged KV)?

A ``VoCoCache`` keeps each cached key at its original position: the prefix at 0..p-1, the VoCo tokens after
the dropped vision tokens (p+V..), and text resumes at its original position. An engine with a paged KV
cache numbers a sequence's tokens 0, 1, 2, ... and gives the next token the position "tokens so far". RoPE
attention depends only on query position minus key position (R(m)q . R(n)k = q . R(n-m)k), so rotating
EVERY cached key by -V (V: all vision tokens dropped) and letting text resume at "tokens so far" (its
original position - V) keeps every query-key distance: the claim is that this is exact (docs/serving.md).
Rotating only the keys after the drop, or none, changes the distances to the prefix; and in ``official``
mask mode text must not read the prefix at all, which a plain causal engine cannot express.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from conftest import load_voco, prompt


def rotated(keys: torch.Tensor, shift: torch.Tensor, rotary) -> torch.Tensor:
    """``keys`` [batch, heads, n, head_dim] (already rotated to their positions) rotated further by ``shift``
    positions each ([n], may be negative)."""
    cos, sin = rotary(keys, shift[None])  # [1, n, head_dim]
    _, moved = apply_rotary_pos_emb(keys, keys, cos, sin)  # unsqueezes the head dimension
    return moved


def contiguous_logits(model, cache, input_ids: torch.Tensor, key_shift: torch.Tensor) -> torch.Tensor:
    """The language model alone, as a paged engine runs it: a plain cache of the VoCo cache's keys (each
    rotated by ``key_shift``) and values, new tokens at positions len(cache), len(cache)+1, ..., causal
    attention over everything cached. Returns logits [1, n, vocab]."""
    language_model = model.model.language_model
    engine_cache = DynamicCache(config=model.config.text_config)
    for index, layer in enumerate(cache.layers):
        engine_cache.update(rotated(layer.keys, key_shift, language_model.rotary_emb), layer.values, index)
    cached = cache.get_seq_length()
    positions = torch.arange(cached, cached + input_ids.shape[1])[None]
    hidden = language_model(input_ids=input_ids, past_key_values=engine_cache, position_ids=positions,
                            use_cache=True).last_hidden_state
    return model.lm_head(hidden)


@torch.no_grad()
def _setup(voco_dir, digit_images, mask_mode: str):
    model, processor = load_voco(voco_dir, voco_mask_mode=mask_mode)
    text = prompt(processor, "What is the sum of the digits?", images=2)
    head = text[: text.rindex("<image>") + len("<image>")]
    inputs = processor(images=digit_images[:2], text=head, return_tensors="pt")
    cache = model.compress(**inputs)
    question = processor.tokenizer(text, return_tensors="pt")["input_ids"]
    question = question[:, (question[0] == processor.image_token_id).nonzero()[-1].item() + 1:]
    # the reference: the model continues its VoCo cache (original positions, its own mask), then decodes greedily
    answer = model.generate(input_ids=question, past_key_values=cache, max_new_tokens=6, do_sample=False)
    sequence = answer[:, :-1]  # question + answer, teacher forced: logits at every position
    reference = model(input_ids=sequence, past_key_values=cache.clone(), use_cache=True).logits
    dropped = int(cache.vision_tokens_dropped.sum())
    return model, cache, sequence, reference, dropped


@torch.no_grad()
def test_rotating_every_cached_key_by_minus_the_dropped_length_is_exact(voco_dir, digit_images):
    model, cache, sequence, reference, dropped = _setup(voco_dir, digit_images, "paper")
    assert dropped == 32  # two 16-token images
    shift = torch.full((cache.get_seq_length(),), -dropped)
    engine = contiguous_logits(model, cache, sequence, shift)
    assert torch.allclose(engine, reference, atol=2e-5, rtol=1e-4), (engine - reference).abs().max()
    assert engine.argmax(-1).equal(reference.argmax(-1))  # the same greedy answer


@torch.no_grad()
def test_contiguous_positions_without_the_rotation_or_with_the_prefix_left_alone_are_not(voco_dir, digit_images):
    model, cache, sequence, reference, dropped = _setup(voco_dir, digit_images, "paper")
    unrotated = contiguous_logits(model, cache, sequence, torch.zeros(cache.get_seq_length(), dtype=torch.long))
    assert (unrotated - reference).abs().max() > 1e-3
    # only the keys after the first dropped image moved (a "contiguous" re-numbering of the cache itself)
    first_voco = int(cache.first_voco_index(model.config.voco_token_id)[0])
    after_drop = torch.zeros(cache.get_seq_length(), dtype=torch.long)
    after_drop[first_voco:] = -dropped
    partial = contiguous_logits(model, cache, sequence, after_drop)
    assert (partial - reference).abs().max() > 1e-3


@torch.no_grad()
def test_official_mode_text_may_not_read_the_prefix_which_a_causal_engine_cannot_express(voco_dir, digit_images):
    model, cache, sequence, reference, dropped = _setup(voco_dir, digit_images, "official")
    shift = torch.full((cache.get_seq_length(),), -dropped)
    engine = contiguous_logits(model, cache, sequence, shift)
    assert (engine - reference).abs().max() > 1e-3


if __name__ == "__main__":
    pytest.main([__file__, "-q"])
