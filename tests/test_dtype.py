"""Dtypes as LLaVA users expect: the training entry loads the model in bf16 under ``--bf16``, fp32 without a
precision flag (a checkpoint saved in fp16, as llava-hf's are, is not left in fp16 by transformers'
``dtype="auto"``), every part it adds in the same dtype."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from transformers import CLIPVisionModel, LlamaForCausalLM

import llava_voco
from llava_voco.train.arguments import parse_args
from llava_voco.train.building import build_model_and_processor
from llava_voco.train.train import main

from test_train import common_args, digit_samples, tiny  # noqa: F401


@pytest.fixture(scope="module")
def fp16(tiny, tmp_path_factory):
    """The tiny checkpoints saved in fp16: a Llava checkpoint, and an LLM and a CLIP directory (set-up (a))."""
    root = tmp_path_factory.mktemp("fp16")
    model = llava_voco.VoCoLlavaForConditionalGeneration.from_pretrained(tiny.llava, dtype=torch.float16)
    model.save_pretrained(root / "llava")
    llava_voco.VoCoLlavaProcessor.from_pretrained(tiny.llava).save_pretrained(root / "llava")
    for name, cls in (("llm", LlamaForCausalLM), ("clip", CLIPVisionModel)):
        cls.from_pretrained(getattr(tiny, name), dtype=torch.float16).save_pretrained(root / name)
        for extra in getattr(tiny, name).iterdir():
            if extra.suffix == ".json" and extra.name != "config.json" or extra.name.startswith("tokenizer"):
                (root / name / extra.name).write_bytes(extra.read_bytes())
    data = root / "data.json"  # one batch, seen again at every step: the loss must fall
    data.write_text(json.dumps(digit_samples(tiny.targets[:4])))
    return root


def saved_dtypes(output_dir) -> set[str]:
    with safe_open(output_dir / "model.safetensors", framework="pt") as handle:
        return {str(handle.get_slice(key).get_dtype()) for key in handle.keys()}


def test_bf16_run_on_an_fp16_checkpoint(tiny, fp16, tmp_path):
    """--bf16 True on a checkpoint saved in fp16 (CPU: bf16 autocast, which fails on fp16 weights): the model is
    loaded in bf16, VoCo's new rows too; the loss is finite and falls; the output is bf16, with no fp16 weight."""
    trainer = main(["--model_name_or_path", str(fp16 / "llava"), "--voco_tokens", "1", "--bf16", "True"]
                   + common_args(tiny, tmp_path / "out", data_path=fp16 / "data.json", max_steps=4, save_strategy="no"))
    assert {p.dtype for p in trainer.model.parameters()} == {torch.bfloat16}
    curve = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(curve) == 4 and all(math.isfinite(loss) for loss in curve)
    assert curve[-1] < curve[0] - 0.1, curve
    assert saved_dtypes(tmp_path / "out") == {"BF16"}
    reloaded = llava_voco.VoCoLlavaForConditionalGeneration.from_pretrained(tmp_path / "out")
    assert reloaded.dtype == torch.bfloat16 and json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.parametrize("flags,dtype", [([], torch.float32), (["--bf16", "True"], torch.bfloat16),
                                         (["--fp16", "True"], torch.float32)],
                         ids=["no flag: fp32", "--bf16", "--fp16 without DeepSpeed: fp32 under fp16 autocast"])
@pytest.mark.parametrize("setup", ["llava checkpoint", "LLM + vision tower"])
def test_every_part_in_one_dtype(tiny, fp16, tmp_path, setup, flags, dtype):
    """Both set-ups, from fp16 files: the loaded parts and the new ones (projector, <image> and <voco> rows) all
    in the training dtype; the new rows are the mean of the others (computed in fp32)."""
    if setup == "llava checkpoint":
        model_flags = ["--model_name_or_path", fp16 / "llava"]
    else:
        model_flags = ["--model_name_or_path", fp16 / "llm", "--vision_tower", fp16 / "clip",
                       "--mm_projector_type", "mlp2x_gelu"]
    model_args, _, training_args = parse_args(
        [str(a) for a in model_flags + ["--voco_tokens", "1"] + flags] + common_args(tiny, tmp_path / "out"))
    model, processor = build_model_and_processor(model_args, training_args)
    assert {p.dtype for p in model.parameters()} == {dtype}
    embeddings = model.get_input_embeddings().weight
    voco_id = model.config.voco_token_id  # the last token added, its row the mean of those before it
    torch.testing.assert_close(embeddings[voco_id], embeddings[:voco_id].float().mean(dim=0).to(dtype), rtol=0, atol=0)
