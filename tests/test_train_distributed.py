"""DeepSpeed on CPU (docs/design.md §7): two processes, gloo, ``DS_ACCELERATOR=cpu``.

The first DeepSpeed run on a machine JIT-builds a shared-memory op (about a minute), later runs reuse it.
"""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from test_train import common_args, layout_a, losses, reload_and_generate, run_cli, tiny  # noqa: F401

pytest.importorskip("deepspeed")

DS_ENV = {"DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(free_port()), "-m", "llava_voco.train"]


def test_zero2_two_processes_match_one_process(tiny, tmp_path):
    """ZeRO-2 on 2 CPU processes x 2 samples == 1 process x 4 samples (the same global batches):
    the same loss at every step and the same weights at the end."""
    args = layout_a(tiny) + ["--voco_tokens", "1"]
    one = tmp_path / "one"
    run_cli(args + common_args(tiny, one, max_steps=4, save_strategy="no"))
    two = tmp_path / "two"
    run_cli(args + ["--deepspeed", "scripts/zero2.json"]
            + common_args(tiny, two, max_steps=4, save_strategy="no", per_device_train_batch_size=2),
            launcher=torchrun(2), env=DS_ENV)

    one_losses, two_losses = losses(one), losses(two)
    assert sorted(two_losses) == [1, 2, 3, 4]
    assert [two_losses[s] for s in range(1, 5)] == pytest.approx([one_losses[s] for s in range(1, 5)], rel=1e-4)
    one_weights, two_weights = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert one_weights.keys() == two_weights.keys()
    for name in one_weights:
        torch.testing.assert_close(two_weights[name], one_weights[name], atol=1e-5, rtol=1e-4, msg=name)
    state = json.loads((two / "trainer_state.json").read_text())
    assert state["global_step"] == 4


def test_llava_finetune_command_with_voco_under_zero3(tiny, tmp_path):
    """A LLaVA user's finetune command (LLaVA's scripts/v1_5/finetune.sh, flag for flag) with tiny local
    paths, our entry in place of llava/train/train_mem.py and --voco_tokens 1 added, launched by the
    deepspeed launcher on 2 CPU processes with ZeRO-3. Changed for CPU, and nothing else: --tf32 True
    dropped (transformers refuses it without an Ampere GPU), --bf16 True dropped (mixed precision for
    GPUs; on CPU it would run a slow bf16 autocast), --use_cpu True added. 64 samples (48 with an image,
    16 text-only) at 16 per process: one epoch is 2 steps; in the second one rank has only text-only
    samples (the blank-image row keeps ZeRO-3's ranks in step)."""
    # Their projector from stage 1: LLaVA's mm_projector.bin, LLaVA's key names.
    llava = load_file(tiny.llava / "model.safetensors")
    torch.save({f"model.mm_projector.{i}.{p}": llava[f"multi_modal_projector.linear_{j}.{p}"]
                for i, j in ((0, 1), (2, 2)) for p in ("weight", "bias")}, tmp_path / "mm_projector.bin")
    output_dir = tmp_path / "llava-v1.5-tiny-voco"
    command = f"""
        --deepspeed ./scripts/zero3.json
        --model_name_or_path {tiny.llm}
        --version v1
        --data_path {tiny.data_path}
        --image_folder {tiny.image_folder}
        --vision_tower {tiny.clip}
        --pretrain_mm_mlp_adapter {tmp_path / "mm_projector.bin"}
        --mm_projector_type mlp2x_gelu
        --mm_vision_select_layer -2
        --mm_use_im_start_end False
        --mm_use_im_patch_token False
        --image_aspect_ratio pad
        --group_by_modality_length True
        --output_dir {output_dir}
        --num_train_epochs 1
        --per_device_train_batch_size 16
        --per_device_eval_batch_size 4
        --gradient_accumulation_steps 1
        --evaluation_strategy no
        --save_strategy steps
        --save_steps 50000
        --save_total_limit 1
        --learning_rate 2e-5
        --weight_decay 0.
        --warmup_ratio 0.03
        --lr_scheduler_type cosine
        --logging_steps 1
        --model_max_length 2048
        --gradient_checkpointing True
        --dataloader_num_workers 4
        --lazy_preprocess True
        --report_to wandb
        --voco_tokens 1
        --use_cpu True
    """.split()
    deepspeed = Path(sys.executable).parent / "deepspeed"
    launcher = [str(deepspeed), "--num_gpus", "2", "--master_port", str(free_port()), "llava_voco/train/train.py"]
    result = run_cli(command, launcher=launcher, env={**DS_ENV, "WANDB_DIR": str(tmp_path)})
    assert result.stdout.count("exits successfully") == 2

    curve = losses(output_dir)
    assert sorted(curve) == [1, 2] and all(0 < loss < 20 for loss in curve.values())
    assert list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    model, processor, new_tokens = reload_and_generate(output_dir, Image.open(tiny.image_folder / "digits/3.png"))
    assert model.config.voco_tokens == 1 and processor.voco_tokens == 1
    assert model.config.vision_feature_layer == -2
    assert len(new_tokens) >= 1


# One ZeRO-3 run per kind of image tokens (mlp2x_gelu without pooling: the LLaVA command above).
ZERO3_PROJECTORS = {
    "linear, CLS kept": ["--mm_projector_type", "linear", "--mm_vision_select_feature", "cls_patch"],
    "pooled mean": ["--mm_projector_type", "mlp2x_gelu", "--vision_token_pooling", "mean"],
    "pooled grid:2, VoCo": ["--mm_projector_type", "mlp2x_gelu", "--vision_token_pooling", "grid:2", "--voco_tokens", "1"],
    "llamavid": ["--mm_projector_type", "llamavid", "--num_query", "4", "--compress_type", "grid:2"],
}


@pytest.mark.parametrize("name", list(ZERO3_PROJECTORS))
def test_zero3_text_only_rank_with_each_projector(tiny, tmp_path, name):
    """ZeRO-3 on 2 CPU processes, one sample each: one rank's batch is text-only while the other's has an
    image, so the text-only rank adds a blank-image row to run the vision tower and projector in step with
    the other. The row must hold the tokens this projector gives an image (pooled, CLS, LLaMA-VID's context
    and content tokens, VoCo) and, for LLaMA-VID, an instruction; otherwise the step fails. One step."""
    from llava_voco.fixtures import train_wordpiece_tokenizer

    samples = json.loads(tiny.data_path.read_text())
    data = tmp_path / "data.json"
    data.write_text(json.dumps([samples[0], next(s for s in samples if "image" not in s)]))
    extra = list(ZERO3_PROJECTORS[name])
    if "llamavid" in extra:
        train_wordpiece_tokenizer().save_pretrained(tmp_path / "bert")
        (tmp_path / "qformer.json").write_text(json.dumps(
            {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4, "intermediate_size": 64}))
        extra += ["--text_decoder_tokenizer", tmp_path / "bert", "--text_decoder_config", tmp_path / "qformer.json"]
    output_dir = tmp_path / "out"
    run_cli(["--model_name_or_path", tiny.llm, "--vision_tower", tiny.clip, "--mm_vision_select_layer", "-2",
             "--deepspeed", "scripts/zero3.json"] + extra
            + common_args(tiny, output_dir, data_path=data, max_steps=1, save_strategy="no",
                          per_device_train_batch_size=1),
            launcher=torchrun(2), env=DS_ENV)
    curve = losses(output_dir)
    assert sorted(curve) == [1] and 0 < curve[1] < 20
