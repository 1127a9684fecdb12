"""Every refusal of the training entry comes before any weight is read (and, from the shell, as one line).

The checkpoints here have the configs, tokenizers and processors of the tiny models of ``test_train`` but
weight files of garbage bytes: a refusal that read a weight first would fail with a safetensors error, not
with the refusal."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import CLIPVisionConfig, InstructBlipConfig

import llava_voco
from llava_voco.train.arguments import TrainConfigError
from llava_voco.train.train import main

from test_train import REPO, common_args, tiny  # noqa: F401

GARBAGE = b"these bytes are not a safetensors file " * 64


def garbage_copy(source, target):
    shutil.copytree(source, target)
    for weights in target.glob("*.safetensors"):
        weights.write_bytes(GARBAGE)
    return target


@pytest.fixture(scope="module")
def broken(tiny, tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("unreadable_weights")
    llava_voco.add_voco_to_llava(tiny.llava, voco_tokens=1, output_dir=root / "voco_source")
    other_clip = root / "other_clip"  # a vision tower of another width than the checkpoint's
    config = CLIPVisionConfig.from_pretrained(tiny.clip)
    config.hidden_size = 48
    config.save_pretrained(other_clip)
    (other_clip / "model.safetensors").write_bytes(GARBAGE)
    instructblip = root / "instructblip"  # 4 query tokens
    InstructBlipConfig(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4},
        qformer_config={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4, "intermediate_size": 64,
                        "encoder_hidden_size": 32},
        text_config={"model_type": "opt", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4,
                     "ffn_dim": 64, "vocab_size": 100, "word_embed_proj_dim": 32},
        num_query_tokens=4,
    ).save_pretrained(instructblip)
    (instructblip / "model.safetensors").write_bytes(GARBAGE)
    from llava_voco.demo.tiny import train_wordpiece_tokenizer

    train_wordpiece_tokenizer().save_pretrained(root / "bert")
    torch.save({"model.mm_projector.weight": torch.zeros(64, 32), "model.mm_projector.bias": torch.zeros(64)},
               root / "linear.bin")
    torch.save({f"model.mm_projector.{i}.{p}": torch.zeros(8) for i in (0, 2) for p in ("weight", "bias")},
               root / "wrong_shapes.bin")
    return SimpleNamespace(
        llava=garbage_copy(tiny.llava, root / "llava"), voco=garbage_copy(root / "voco_source", root / "voco"),
        llm=garbage_copy(tiny.llm, root / "llm"), clip=garbage_copy(tiny.clip, root / "clip"),
        other_clip=other_clip, instructblip=instructblip, bert=root / "bert", root=root,
    )


def refusals(broken):
    llava, voco = ["--model_name_or_path", broken.llava], ["--model_name_or_path", broken.voco]
    layout_a = ["--model_name_or_path", broken.llm, "--vision_tower", broken.clip]
    llamavid = [*layout_a, "--mm_projector_type", "llamavid", "--num_query", "8"]
    return {
        "flash_attention_2 without flash-attn": (
            [*voco, "--attn_implementation", "flash_attention_2"], r"pip install 'llava-voco\[gpu\]'"),
        "varlen_torch on CPU": ([*llava, "--attn_implementation", "varlen_torch"], "CUDA only"),
        "flex_attention on CPU": ([*llava, "--attn_implementation", "flex_attention"], "no backward on CPU"),
        "unknown backend": ([*llava, "--attn_implementation", "magic"], "supported: sdpa, eager"),
        "both precisions": ([*llava, "--bf16", "True", "--fp16", "True"], "At most one of fp16 and bf16"),
        "anyres": ([*llava, "--image_aspect_ratio", "anyres"], "anyres"),
        "unknown template": ([*llava, "--version", "nope"], "unknown conversation template --version 'nope'"),
        "no data file": ([*llava, "--data_path", broken.root / "nope.json"], "--data_path .*nope.json: no such file"),
        "bits": ([*llava, "--bits", "4"], "bitsandbytes"),
        "another k": ([*voco, "--voco_tokens", "2"], "saved with voco_tokens=1"),
        "another mask mode": ([*voco, "--voco_mask_mode", "official"], "trained with voco_mask_mode=paper"),
        "another projector": ([*llava, "--mm_projector_type", "linear"], "has a mlp2x_gelu projector"),
        "another pooling": ([*llava, "--vision_token_pooling", "mean"], "vision_token_pooling=none"),
        "another select feature": ([*llava, "--mm_vision_select_feature", "cls_patch"], "number of image tokens"),
        "vision tower of another width": (
            [*llava, "--vision_tower", broken.other_clip], "does not match the vision tower .*hidden_size: 48"),
        "no adapter file": ([*llava, "--pretrain_mm_mlp_adapter", broken.root / "nope.bin"], "no such file"),
        "adapter of another type": (
            [*llava, "--pretrain_mm_mlp_adapter", broken.root / "linear.bin"], "is not a weight of LLaVA's 'mlp2x_gelu'"),
        "adapter of other shapes": (
            [*layout_a, "--mm_projector_type", "mlp2x_gelu", "--pretrain_mm_mlp_adapter",
             broken.root / "wrong_shapes.bin"], "wrong_shapes.bin: holds"),
        "LLM without a vision tower": (["--model_name_or_path", broken.llm], "needs --vision_tower"),
        "llamavid without its tokenizer": (llamavid, "needs --text_decoder_tokenizer"),
        "llamavid queries": (
            [*llamavid, "--text_decoder_tokenizer", broken.bert, "--text_decoder_path", broken.instructblip],
            "--text_decoder_path: .*has 4 query_tokens, --num_query is 8"),
    }


CASES = list(refusals(SimpleNamespace(llava="", voco="", llm="", clip="", other_clip="", instructblip="", bert="",
                                      root=Path("."))))  # the names only


@pytest.mark.parametrize("case", CASES)
def test_refused_before_any_weight_is_read(tiny, broken, tmp_path, case):
    argv, message = refusals(broken)[case]
    with pytest.raises(TrainConfigError, match=message) as refused:
        main(common_args(tiny, tmp_path / "out", max_steps=1) + [str(a) for a in argv])  # the case's flags win
    assert "\n" not in str(refused.value).strip() or case == "both precisions"


def test_refused_from_the_shell_in_seconds_as_one_line(tiny, broken, tmp_path):
    """The CLI: exit status 2, one line naming the flag, no traceback, within seconds (interpreter start-up
    and imports; no model is loaded)."""
    command = [sys.executable, "-m", "llava_voco.train", "--model_name_or_path", broken.voco,
               "--attn_implementation", "flash_attention_2"] + common_args(tiny, tmp_path / "out")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    result = subprocess.run([str(c) for c in command], env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - start
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert errors == [line for line in errors if line.startswith("llava-voco-train: error: --attn_implementation "
                                                                 "flash_attention_2: ")] and len(errors) == 1, errors
    assert "Traceback" not in result.stderr and "Loading weights" not in result.stderr
    assert elapsed < 20, elapsed  # measured: 7.7 s on a loaded 2-core machine, of which 5.7 s importing torch and transformers


def test_a_checkpoint_of_mixed_dtypes_is_refused(tiny, tmp_path):
    """Refused with a message after loading too: a model whose parts are in several dtypes."""
    from llava_voco.train.building import check_one_dtype

    model = llava_voco.VoCoLlavaForConditionalGeneration.from_pretrained(tiny.llava, dtype=torch.float32)
    check_one_dtype(model, torch.float32)
    model.model.multi_modal_projector.half()
    with pytest.raises(TrainConfigError, match=r"mixes dtypes: training in float32 .*, but float16: 4 weights, "
                                               r"e\.g\. model\.multi_modal_projector"):
        check_one_dtype(model, torch.float32)
