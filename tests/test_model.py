"""VoCoLlavaForConditionalGeneration on a tiny real LLaVA: the mask reaches every layer, backends agree,
k=0 is plain LLaVA, information still flows through the VoCo tokens, and generate is right."""

import copy

import pytest
import torch
from transformers import LlavaForConditionalGeneration, LlavaProcessor
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask
from transformers.modeling_utils import AttentionInterface

from llava_voco import VoCoLayoutError, VoCoLlavaConfig, VoCoLlavaForConditionalGeneration

from conftest import load_voco, prompt

# float32 on CPU: eager and sdpa differ only by summation order.
LOGIT_ATOL = 1e-5
GRAD_ATOL = 1e-5


def voco_batch(processor, images, padding_side="right", answers=True):
    """Three samples: one image, two images, text only (so padding is real)."""
    texts = [
        prompt(processor, "What is the sum of the digits?", 1, "7" if answers else None),
        prompt(processor, "Which digit is at the top left?", 2, "3" if answers else None),
        prompt(processor, "What is the largest digit? Describe the picture.", 0, "9" if answers else None),
    ]
    processor.tokenizer.padding_side = padding_side
    batch = processor(images=images[:3], text=texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = -100
    return batch, labels


def special_positions(model, input_ids, row):
    ids = input_ids[row]
    image = (ids == model.config.image_token_id).nonzero().squeeze(1)
    voco = (ids == model.config.voco_token_id).nonzero().squeeze(1)
    return image, voco


def test_text_never_attends_to_compressed_vision(voco_dir, digit_images):
    model, processor = load_voco(voco_dir, attn_implementation="eager")
    for side in ("right", "left"):
        batch, _ = voco_batch(processor, digit_images, side)
        out = model(**batch, output_attentions=True)
        assert len(out.attentions) == model.config.text_config.num_hidden_layers
        for row in (0, 1):
            image, voco = special_positions(model, batch["input_ids"], row)
            n = len(image) // (1 if row == 0 else 2)
            real = batch["attention_mask"][row].nonzero().squeeze(1)
            text_rows = real[real > voco.max()]
            assert len(text_rows) > 5
            for layer_attention in out.attentions:
                probs = layer_attention[row][:, text_rows]  # [heads, text, kv]
                assert torch.all(probs[:, :, image] == 0), f"row {row} text sees vision ({side} padding)"
                assert torch.all(probs[:, :, voco] > 0), f"row {row} text does not see VoCo ({side} padding)"
            if row == 1:  # the second image's vision tokens see the first image only through its VoCo token
                second_vision = image[n:]
                for layer_attention in out.attentions:
                    probs = layer_attention[row][:, second_vision]
                    assert torch.all(probs[:, :, image[:n]] == 0)
                    assert torch.all(probs[:, :, voco[0]] > 0)


def test_eager_and_sdpa_agree_on_logits_and_gradients(voco_dir, digit_images):
    results = {}
    for implementation in ("eager", "sdpa"):
        model, processor = load_voco(voco_dir, attn_implementation=implementation)
        model.train()  # dropout is 0; train mode exercises the training code path
        batch, labels = voco_batch(processor, digit_images, "right")
        out = model(**batch, labels=labels)
        out.loss.backward()
        real = batch["attention_mask"].bool()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results[implementation] = (out.logits[real].detach(), out.loss.detach(), grads)
    (eager_logits, eager_loss, eager_grads), (sdpa_logits, sdpa_loss, sdpa_grads) = results["eager"], results["sdpa"]
    torch.testing.assert_close(sdpa_logits, eager_logits, atol=LOGIT_ATOL, rtol=0)
    torch.testing.assert_close(sdpa_loss, eager_loss, atol=LOGIT_ATOL, rtol=0)
    assert eager_grads.keys() == sdpa_grads.keys() and len(eager_grads) > 20
    for name in eager_grads:
        torch.testing.assert_close(sdpa_grads[name], eager_grads[name], atol=GRAD_ATOL, rtol=1e-4, msg=name)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_voco_tokens_zero_is_plain_llava(llava_dir, digit_images, implementation, padding_side):
    llava = LlavaForConditionalGeneration.from_pretrained(llava_dir, attn_implementation=implementation).eval()
    processor = LlavaProcessor.from_pretrained(llava_dir)
    config = VoCoLlavaConfig(**{k: v for k, v in llava.config.to_dict().items() if k != "model_type"})
    assert config.voco_tokens == 0
    voco = VoCoLlavaForConditionalGeneration(config).eval()
    voco.load_state_dict(llava.state_dict(), strict=True)  # same parameter names
    voco.set_attn_implementation(implementation)
    batch, labels = voco_batch(processor, digit_images, padding_side)
    with torch.no_grad():
        expected = llava(**batch, labels=labels)
        got = voco(**batch, labels=labels)
    assert torch.equal(got.logits, expected.logits)  # to the bit: the same computation
    assert torch.equal(got.loss, expected.loss)
    # and back: the VoCo model's state dict is a Llava state dict
    assert llava.load_state_dict(voco.state_dict(), strict=True) is not None


def test_information_flows_through_voco(voco_dir, digit_images):
    """The answer still depends on the image (a mask that blocks too much fails here)."""
    model, processor = load_voco(voco_dir)
    text = prompt(processor, "Which digit is at the top left?")
    with torch.no_grad():
        first = model(**processor(images=digit_images[0], text=text, return_tensors="pt")).logits[0, -1]
        second = model(**processor(images=digit_images[1], text=text, return_tensors="pt")).logits[0, -1]
    assert (first - second).abs().max() > 1e-4


def test_dropping_vision_from_the_cache_changes_nothing(voco_dir, digit_images):
    """docs/design.md §2.3 equivalence 1: the masked full forward == prefill [prefix, V, VoCo], drop V's keys and
    values from every layer, then run the text on that cache with its original positions."""
    model, processor = load_voco(voco_dir)
    batch = processor(images=digit_images[4], text=prompt(processor, "Which digit is at the top left?"), return_tensors="pt")
    ids = batch["input_ids"]
    image, voco = special_positions(model, ids, 0)
    text_start = int(voco.max()) + 1
    keep = torch.tensor([i for i in range(text_start) if i not in set(image.tolist())])
    language_model = model.model.language_model
    with torch.no_grad():
        full = model(**batch).logits[:, text_start:]
        head = model(input_ids=ids[:, :text_start], pixel_values=batch["pixel_values"], use_cache=True)
        cache = head.past_key_values
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys[:, :, keep], layer.values[:, :, keep]
        assert cache.get_seq_length() == text_start - len(image)
        text_embeds = model.get_input_embeddings()(ids[:, text_start:])

        def text_logits(position_ids):
            hidden = language_model(
                inputs_embeds=text_embeds, past_key_values=copy.deepcopy(cache), position_ids=position_ids
            ).last_hidden_state
            return model.lm_head(hidden)

        offset = torch.arange(text_start, ids.shape[1])[None]
        compressed = text_logits(offset)
        no_offset = text_logits(offset - len(image))
    torch.testing.assert_close(compressed, full, atol=LOGIT_ATOL, rtol=0)
    assert (no_offset - full).abs().max() > 1e-4  # the offset matters, so the check above can fail


def test_labels_gradient_checkpointing_same_loss_and_grads(voco_dir, digit_images):
    model, processor = load_voco(voco_dir)
    batch, labels = voco_batch(processor, digit_images, "right")
    model.train()
    loss = model(**batch, labels=labels).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    loss_ckpt = model(**batch, labels=labels).loss
    loss_ckpt.backward()
    assert torch.isfinite(loss) and torch.equal(loss, loss_ckpt)
    for name, grad in grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_generate_matches_full_forward_greedy(voco_dir, digit_images, implementation):
    """generate (cache, one token a step, layout re-derived each step) == greedy by full forwards."""
    model, processor = load_voco(voco_dir, attn_implementation=implementation)
    batch, _ = voco_batch(processor, digit_images, "left", answers=False)
    with torch.no_grad():
        generated = model.generate(**batch, max_new_tokens=6, do_sample=False)
        ids, attention = batch["input_ids"], batch["attention_mask"]
        for _ in range(6):
            logits = model(input_ids=ids, attention_mask=attention, pixel_values=batch["pixel_values"]).logits
            next_token = logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_token], dim=1)
            attention = torch.cat([attention, torch.ones_like(next_token)], dim=1)
    assert torch.equal(generated, ids)


def test_mask_modes_differ_where_the_design_says(voco_dir, digit_images):
    paper, processor = load_voco(voco_dir)
    official, _ = load_voco(voco_dir, voco_mask_mode="official")
    assert official.config.voco_mask_mode == "official"
    batch = processor(images=digit_images[0], text=prompt(processor, "What is the sum?"), return_tensors="pt")
    _, voco = special_positions(paper, batch["input_ids"], 0)
    with torch.no_grad():
        a, b = paper(**batch).logits[0], official(**batch).logits[0]
    last_voco = int(voco.max())
    assert torch.equal(a[: last_voco + 1], b[: last_voco + 1])  # up to the VoCo tokens the modes agree
    assert (a[last_voco + 1 :] - b[last_voco + 1 :]).abs().max() > 1e-5  # text rows differ


def test_errors(voco_dir, digit_images):
    model, processor = load_voco(voco_dir)
    text = prompt(processor, "What is the sum?")
    batch = processor(images=digit_images[0], text=text, return_tensors="pt")
    voco_id = model.config.voco_token_id
    truncated = batch["input_ids"][batch["input_ids"] != voco_id][None]
    with pytest.raises(VoCoLayoutError, match="followed by 0 VoCo"):
        model(input_ids=truncated, pixel_values=batch["pixel_values"])
    two_images = torch.cat([batch["pixel_values"]] * 2)
    with pytest.raises(VoCoLayoutError, match=r"1 image span\(s\).*but 2 image\(s\) were given"):
        model(input_ids=batch["input_ids"], pixel_values=two_images)
    two_spans = processor(images=digit_images[:2], text=prompt(processor, "What is the sum?", 2), return_tensors="pt")
    with pytest.raises(VoCoLayoutError, match=r"2 image span\(s\).*but 1 image\(s\) were given"):
        model(input_ids=two_spans["input_ids"], pixel_values=two_spans["pixel_values"][:1])
    orphan = batch["input_ids"].clone()
    orphan[0, 2] = voco_id
    with pytest.raises(VoCoLayoutError, match="no image span right before"):
        model(input_ids=orphan, pixel_values=batch["pixel_values"])
    with torch.no_grad():
        out = model(**batch, use_cache=True)
    with pytest.raises(ValueError, match="needs voco_layout"):
        model(input_ids=batch["input_ids"][:, -1:], past_key_values=out.past_key_values)


def test_backend_that_cannot_express_the_mask_is_refused(voco_dir, digit_images):
    """A flash-attn style backend (mask builder that keeps only padding) would silently drop the
    VoCo rule; the model refuses it instead. Flash varlen will be its own backend (docs/design.md §2.5)."""
    AttentionInterface.register("padding_only_test", sdpa_attention_forward)
    AttentionMaskInterface.register("padding_only_test", flash_attention_mask)
    model, processor = load_voco(voco_dir)
    model.set_attn_implementation({"text_config": "padding_only_test", "vision_config": "sdpa"})
    batch = processor(images=digit_images[0], text=prompt(processor, "What?"), return_tensors="pt")
    with pytest.raises(ValueError, match="cannot be expressed with attn_implementation='padding_only_test'"):
        model(**batch)


def test_explicit_layout_continues_a_cache(voco_dir, digit_images):
    """Manual decoding: pass the layout of the whole sequence and the cache; logits equal full forward."""
    model, processor = load_voco(voco_dir)
    batch = processor(images=digit_images[0], text=prompt(processor, "What is the sum?"), return_tensors="pt")
    ids = batch["input_ids"]
    with torch.no_grad():
        full = model(**batch).logits
        head = model(input_ids=ids[:, :-3], pixel_values=batch["pixel_values"], use_cache=True)
        layout = model.model.voco_layout(ids)
        tail = model(input_ids=ids[:, -3:], past_key_values=head.past_key_values, voco_layout=layout)
    torch.testing.assert_close(tail.logits, full[:, -3:], atol=LOGIT_ATOL, rtol=0)


def test_flex_attention_forward_matches_sdpa(voco_dir, digit_images):
    """flex builds a BlockMask from the same mask function. CPU flex has no backward, so the training
    equivalence for flex waits for a GPU; the forward (inference) is checked here."""
    results = {}
    for implementation in ("sdpa", "flex_attention"):
        model, processor = load_voco(voco_dir, attn_implementation={"text_config": implementation, "vision_config": "sdpa"})
        batch, _ = voco_batch(processor, digit_images, "left", answers=False)
        with torch.no_grad():
            results[implementation] = model(**batch).logits[batch["attention_mask"].bool()]
    torch.testing.assert_close(results["flex_attention"], results["sdpa"], atol=LOGIT_ATOL, rtol=0)
