"""A new way an image becomes tokens, and a new attention backend, each added from this file alone (issue 24):
``register_projector`` / ``register_attention_backend`` are the only seams used, nothing in the package changes."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from llava_voco.model.attention import AttentionBackend, attention_backend_names, register_attention_backend
from llava_voco.model.projectors import ImageProjector, pool_patches, projector_input_size, register_projector
from llava_voco.model.varlen import varlen_reference_attention
from llava_voco.train.train import main

from conftest import load_voco, prompt
from test_train import common_args, tiny  # noqa: F401
from test_varlen import batch_for


# ---- a projector method: average pooling to 4 tokens ----------------------------------------------------
class AveragePoolTo4(ImageProjector):
    """Each image's patches averaged over a 2 x 2 grid, then one linear layer: 4 tokens per image or frame."""

    def build(self, config):
        return torch.nn.Linear(projector_input_size(config), config.text_config.hidden_size)

    def image_tokens(self, spec, is_frame):
        return 4

    def encode(self, model, patches, images, grid):
        return list(model.multi_modal_projector(pool_patches(patches, "grid:2", grid)))  # per image [4, D]


register_projector("avgpool4", AveragePoolTo4, replace=True)


def test_a_projector_registered_here_trains_compresses_and_generates(tiny, tmp_path, digit_images):  # noqa: F811
    out = tmp_path / "out"
    trainer = main(["--model_name_or_path", str(tiny.llm), "--vision_tower", str(tiny.clip), "--mm_projector_type",
                    "avgpool4", "--voco_tokens", "1"] + common_args(tiny, out, max_steps=4, save_strategy="no"))
    trained = trainer.model.model.multi_modal_projector
    assert isinstance(trained, torch.nn.Linear)
    first, last = trainer.state.log_history[0]["loss"], trainer.state.log_history[3]["loss"]
    assert last < first  # it learned through the method's own encode

    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    assert model.config.mm_projector_type == processor.mm_projector_type == "avgpool4"
    torch.testing.assert_close(model.model.multi_modal_projector.weight, trained.weight.detach())
    text = prompt(processor, "What is in the image?")
    batch = processor(images=digit_images[0], text=text, return_tensors="pt")
    ids = batch["input_ids"][0].tolist()
    assert ids.count(model.config.image_token_id) == 4 and ids.count(model.config.voco_token_id) == 1
    head = processor(images=digit_images[0], text=text[: text.index("<image>") + len("<image>")], return_tensors="pt")
    assert torch.equal(batch["input_ids"][:, : head["input_ids"].shape[1]], head["input_ids"])
    rest = batch["input_ids"][:, head["input_ids"].shape[1]:]
    with torch.no_grad():
        full = model.generate(**batch, max_new_tokens=5, do_sample=False)[0, batch["input_ids"].shape[1]:]
        cache = model.compress(**head)
        from_cache = model.generate(input_ids=rest, past_key_values=cache, max_new_tokens=5, do_sample=False)
    assert cache.get_seq_length() == head["input_ids"].shape[1] - 4  # the 4 pooled tokens dropped, VoCo kept
    assert from_cache[0, rest.shape[1]:].tolist() == full.tolist()


# ---- an attention backend: a wrapper of the reference varlen kernel -------------------------------------
KERNEL_CALLS = []


def wrapped_reference_kernel(*args, **kwargs):
    """flash_attn_varlen_func's signature: the package's pure-torch kernel, counted."""
    KERNEL_CALLS.append(1)
    return varlen_reference_attention(*args, **kwargs)


register_attention_backend(
    AttentionBackend("test_varlen_wrapper", "varlen", "VoCo rule as a varlen segment plan, a test's kernel",
                     vision="sdpa", kernel=wrapped_reference_kernel),
    replace=True,
)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_a_backend_registered_here_gives_the_logits_of_sdpa(voco_dir, digit_images, padding_side):
    assert "test_varlen_wrapper" in attention_backend_names()
    reference, processor = load_voco(voco_dir, attn_implementation="sdpa")
    registered, _ = load_voco(voco_dir, attn_implementation={"text_config": "test_varlen_wrapper",
                                                             "vision_config": "sdpa"})
    batch = batch_for(processor, digit_images, [1, 3, 0], padding_side)
    real = batch["attention_mask"].bool()
    KERNEL_CALLS.clear()
    with torch.no_grad():
        expected = reference(**batch).logits[real]
        got = registered(**batch).logits[real]
        unmasked = registered(**batch, voco_mask=False).logits[real]
    assert len(KERNEL_CALLS) == 2 * registered.config.text_config.num_hidden_layers  # it ran, every layer
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert (unmasked - expected).abs().max() > 1e-3  # the rule reached the kernel through the plan


def test_the_registries_refuse_what_would_be_silently_wrong():
    """A name taken twice, an unknown name (listing what is there), a varlen backend without a kernel."""
    with pytest.raises(ValueError, match="'avgpool4' is registered already"):
        register_projector("avgpool4", AveragePoolTo4)
    from llava_voco import VoCoLlavaConfig
    from llava_voco.model.attention import attention_backend

    with pytest.raises(ValueError, match=r"unknown mm_projector_type 'avgpool9'; supported: linear, mlp2x_gelu, llamavid"):
        VoCoLlavaConfig(mm_projector_type="avgpool9")
    with pytest.raises(ValueError, match="is registered already"):
        register_attention_backend(AttentionBackend("sdpa", "dense", "again"))
    with pytest.raises(ValueError, match="needs its kernel"):
        register_attention_backend(AttentionBackend("kernelless", "varlen", "no kernel"))
    with pytest.raises(ValueError, match="rule must be one of"):
        register_attention_backend(AttentionBackend("masked_somehow", "sparse", "?"))
    with pytest.raises(ValueError, match="supported: sdpa, eager, flex_attention"):
        attention_backend("magic")
    assert "kernelless" not in attention_backend_names()
