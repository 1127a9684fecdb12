"""What VoCo needs to train when the LLM is frozen: the <voco> rows, its only new parameters.

Under ``--lora_enable`` the <voco> embedding row (and lm_head row, untied here) train as PEFT trainable tokens,
are saved with the adapter and merged into the weights on save; under ``--freeze_backbone`` the <voco>
embedding row trains and no other row of the embedding moves (not even by weight decay)."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

import llava_voco
from llava_voco.train.train import main

from test_train import common_args, tiny  # noqa: F401


def rows_that_moved(trained: torch.Tensor, start: torch.Tensor) -> list[int]:
    return (trained != start).any(dim=1).nonzero().flatten().tolist()


def test_lora_trains_saves_and_merges_the_voco_rows(tiny, tmp_path):
    args = ["--model_name_or_path", str(tiny.llava), "--voco_tokens", "1", "--lora_enable", "True", "--lora_r", "8",
            "--lora_alpha", "16", "--lora_dropout", "0"]
    main(args + common_args(tiny, tmp_path / "merged", max_steps=3, save_strategy="no", weight_decay=0.1))

    start, _ = llava_voco.add_voco_to_llava(tiny.llava, voco_tokens=1)
    assert not [k for k in load_file(tmp_path / "merged" / "model.safetensors") if "lora" in k or "trainable_tokens" in k]
    merged = llava_voco.VoCoLlavaForConditionalGeneration.from_pretrained(tmp_path / "merged").state_dict()
    voco_id = start.config.voco_token_id
    embed = "model.language_model.embed_tokens.weight"
    assert rows_that_moved(merged[embed], start.state_dict()[embed]) == [voco_id]
    assert rows_that_moved(merged["lm_head.weight"], start.state_dict()["lm_head.weight"]) == [voco_id]


def test_freeze_backbone_trains_the_voco_row_only(tiny, tmp_path):
    main(["--model_name_or_path", str(tiny.llava), "--voco_tokens", "1", "--freeze_backbone", "True"]
         + common_args(tiny, tmp_path / "out", max_steps=2, save_strategy="no", weight_decay=0.1))
    trained = llava_voco.VoCoLlavaForConditionalGeneration.from_pretrained(tmp_path / "out").state_dict()
    start, _ = llava_voco.add_voco_to_llava(tiny.llava, voco_tokens=1)
    start = start.state_dict()
    embed = "model.language_model.embed_tokens.weight"
    voco_id = llava_voco.VoCoLlavaConfig.from_pretrained(tmp_path / "out").voco_token_id
    assert rows_that_moved(trained[embed], start[embed]) == [voco_id]
    for name, tensor in start.items():
        if name.startswith("model.language_model.") and name != embed:
            assert torch.equal(trained[name], tensor), name  # the LLM body stays
    assert not torch.equal(trained["lm_head.weight"], start["lm_head.weight"])  # as in LLaVA, lm_head trains
    assert not torch.equal(trained["model.multi_modal_projector.linear_1.weight"],
                           start["model.multi_modal_projector.linear_1.weight"])
