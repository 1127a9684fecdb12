"""``--attn_implementation``: the backends the training entry takes, the one it logs, and flash-attn's VoCo path
for a model whose VoCo is switched on after loading (set-up (a), or VoCo fine-tuning from plain Llava)."""

from __future__ import annotations

import logging

import pytest

import llava_voco
from llava_voco.model.builder import use_voco_attention
from llava_voco.model.attention import attention_backend, attention_backend_names
from llava_voco.train.arguments import parse_args
from llava_voco.train.checks import check_attn_implementation
from llava_voco.train.train import main

from test_train import common_args, layout_a, tiny  # noqa: F401


def test_the_flag_takes_every_backend(tiny, tmp_path):
    assert attention_backend_names()[:6] == ("sdpa", "eager", "flex_attention", "varlen_reference", "varlen_torch",
                                    "flash_attention_2")
    for attn in ("sdpa", "eager", "varlen_reference"):  # the others are refused on this CPU machine, with a reason
        model_args, _, training_args = parse_args(layout_a(tiny) + ["--attn_implementation", attn]
                                                  + common_args(tiny, tmp_path))
        check_attn_implementation(model_args, training_args)


@pytest.mark.parametrize("attn", ["eager", "varlen_reference"])
def test_the_entry_logs_the_backend_that_runs(tiny, tmp_path, caplog, attn):
    caplog.set_level(logging.INFO, logger="llava_voco.train")
    trainer = main(["--model_name_or_path", str(tiny.llava), "--voco_tokens", "1", "--attn_implementation", attn]
                   + common_args(tiny, tmp_path / "out", max_steps=1, save_strategy="no"))
    model = trainer.model
    assert model.model.language_model.config._attn_implementation == attn
    assert model.model.vision_tower.config._attn_implementation == ("sdpa" if attn.startswith("varlen") else attn)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("attention: "))
    assert line.startswith(f"attention: language model {attn} (VoCo rule as ")
    assert line.endswith("vision tower " + ("sdpa" if attn.startswith("varlen") else attn))


def test_flash_attention_on_a_model_given_voco_after_loading(voco_dir):
    """transformers' flash path keeps only padding: a model loaded with flash_attention_2 and VoCo switched on
    afterwards runs flash-attn through the VoCo segment plan instead (``use_voco_attention``)."""
    model = llava_voco.VoCoLlavaForConditionalGeneration.from_pretrained(voco_dir)
    text_config = model.model.language_model.config
    text_config._attn_implementation = "flash_attention_2"  # as from_pretrained(attn_implementation=...) sets it
    model.config.voco_tokens = 0
    use_voco_attention(model)
    assert text_config._attn_implementation == "flash_attention_2"  # VoCo off: transformers' own path
    model.config.voco_tokens = 1
    use_voco_attention(model)
    assert text_config._attn_implementation == attention_backend("flash_attention_2").implementation == "voco_flash_attention_2"
