"""DeepSpeed on CPU (docs/design.md §7): two processes, gloo, ``DS_ACCELERATOR=cpu``.

ZeRO-2 and ZeRO-3 on 2 processes give the losses (rel 1e-4) and final weights (1e-5) of 1 process without
DeepSpeed over the same global batches, text-only batches included (on one rank or on both: the blank-image
row); the ZeRO-3 checkpoint answers with the single process's tokens. ZeRO-3 is compared so for every kind of
image tokens (linear with CLS, pooled, pooled + VoCo, LLaMA-VID; the last two with ``--packing True``). Also:
LLaVA's finetune command under ZeRO-3, and ``--bf16`` under ZeRO-3 on an fp16 checkpoint. One single-process
run serves both mlp2x_gelu comparisons.

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

from llava_voco.train.train import main
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


@pytest.fixture(scope="module")
def mixed_data(tiny, tmp_path_factory):
    """16 samples, 10 with an image and 6 text-only, in one epoch of 4 global batches of 4 under
    --group_by_modality_length (LLaVA's megabatches: per-rank batch x ranks): two image batches, one text-only
    batch (every rank adds the ZeRO-3 blank-image row) and the leftovers, 2 image + 2 text-only samples (on 2
    ranks one rank's batch is text-only while the other's has images)."""
    samples = json.loads(tiny.data_path.read_text())
    data = tmp_path_factory.mktemp("mixed") / "data.json"
    data.write_text(json.dumps(samples[:10] + [s for s in samples if "image" not in s][:6]))
    return data


def run_args(tiny, data, output_dir, ranks: int, *extra) -> list:
    """The same 4 global batches of 4 samples on 1 or 2 processes."""
    return [*extra, "--group_by_modality_length", "True"] + common_args(
        tiny, output_dir, data_path=data, num_train_epochs=1, save_strategy="no", per_device_train_batch_size=4 // ranks)


@pytest.fixture(scope="module")
def one_process(tiny, mixed_data, tmp_path_factory):
    """VoCo (k=1) on mlp2x_gelu, 1 process, no DeepSpeed: what ZeRO-2 and ZeRO-3 on 2 processes must match."""
    output_dir = tmp_path_factory.mktemp("one_process") / "out"
    main([str(a) for a in run_args(tiny, mixed_data, output_dir, 1, *layout_a(tiny), "--voco_tokens", "1")])
    return output_dir


def assert_same_run(one, two, steps=(1, 2, 3, 4)):
    """Two runs of the same global batches: the same loss at every step (rel 1e-4, as float sums on 2 ranks
    round differently) and the same weights at the end (atol 1e-5); returns the loss table."""
    one_losses, two_losses = losses(one), losses(two)
    assert sorted(two_losses) == list(steps)
    table = [(step, one_losses[step], two_losses[step], two_losses[step] - one_losses[step]) for step in steps]
    print("\n".join(f"step {s}: 1 process {a:.6f}, 2 processes {b:.6f}, difference {d:+.2e}" for s, a, b, d in table))
    assert [two_losses[s] for s in steps] == pytest.approx([one_losses[s] for s in steps], rel=1e-4)
    one_weights, two_weights = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert one_weights.keys() == two_weights.keys()
    for name in one_weights:
        torch.testing.assert_close(two_weights[name], one_weights[name], atol=1e-5, rtol=1e-4, msg=name)
    return table


def test_zero2_two_processes_match_one_process(tiny, mixed_data, one_process, tmp_path):
    """ZeRO-2 on 2 CPU processes x 2 samples == 1 process x 4 samples (the same global batches): the same loss
    at every step and the same weights at the end."""
    two = tmp_path / "two"
    run_cli(run_args(tiny, mixed_data, two, 2, *layout_a(tiny), "--voco_tokens", "1", "--deepspeed", "scripts/zero2.json"),
            launcher=torchrun(2), env=DS_ENV)
    assert_same_run(one_process, two)
    assert json.loads((two / "trainer_state.json").read_text())["global_step"] == 4


def test_zero3_two_processes_match_one_process_and_generate_the_same(tiny, mixed_data, one_process, tmp_path):
    """ZeRO-3 on 2 CPU processes == 1 process without DeepSpeed, as ZeRO-2: the same losses and weights, with
    text-only batches in the mix (blank-image rows on one rank or on both); the saved ZeRO-3 checkpoint
    reloads and answers with the same tokens as the one trained without DeepSpeed."""
    two = tmp_path / "two"
    run_cli(run_args(tiny, mixed_data, two, 2, *layout_a(tiny), "--voco_tokens", "1", "--deepspeed", "scripts/zero3.json"),
            launcher=torchrun(2), env=DS_ENV)
    assert_same_run(one_process, two)
    for digit in (3, 7):
        image = Image.open(tiny.image_folder / f"digits/{digit}.png")
        _, _, one_tokens = reload_and_generate(one_process, image)
        _, _, two_tokens = reload_and_generate(two, image)
        assert two_tokens.tolist() == one_tokens.tolist()


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


# One ZeRO-3 comparison per kind of image tokens (mlp2x_gelu without pooling: the tests above); two of them with
# --packing True on 2 processes against the padded run on 1 (packed rows beside the blank-image row).
ZERO3_PROJECTORS = {
    "linear, CLS kept": ["--mm_projector_type", "linear", "--mm_vision_select_feature", "cls_patch"],
    "pooled mean": ["--mm_projector_type", "mlp2x_gelu", "--vision_token_pooling", "mean"],
    "pooled grid:2, VoCo, packed": ["--mm_projector_type", "mlp2x_gelu", "--vision_token_pooling", "grid:2",
                                    "--voco_tokens", "1"],
    "llamavid, packed": ["--mm_projector_type", "llamavid", "--num_query", "4", "--compress_type", "grid:2"],
}


@pytest.mark.parametrize("name", list(ZERO3_PROJECTORS))
def test_zero3_with_each_projector_matches_one_process(tiny, tmp_path, name):
    """ZeRO-3 on 2 CPU processes against 1 process without DeepSpeed, 2 global batches of 4: 4 image samples,
    then 2 image + 2 text-only samples, so on 2 processes one rank's batch is text-only while the other's has
    images and the text-only rank adds a blank-image row to run the vision tower and projector in step. The row
    must hold the tokens this projector gives an image (pooled, CLS, LLaMA-VID's context and content tokens,
    VoCo) and, for LLaMA-VID, an instruction; with it, the losses and weights are the single process's."""
    from llava_voco.demo.tiny import train_wordpiece_tokenizer

    samples = json.loads(tiny.data_path.read_text())
    data = tmp_path / "data.json"
    data.write_text(json.dumps(samples[:6] + [s for s in samples if "image" not in s][:2]))
    extra = list(ZERO3_PROJECTORS[name])
    if "llamavid" in extra:
        train_wordpiece_tokenizer().save_pretrained(tmp_path / "bert")
        (tmp_path / "qformer.json").write_text(json.dumps(
            {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4, "intermediate_size": 64,
             "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}))
        extra += ["--text_decoder_tokenizer", tmp_path / "bert", "--text_decoder_config", tmp_path / "qformer.json"]
    base = ["--model_name_or_path", tiny.llm, "--vision_tower", tiny.clip, "--mm_vision_select_layer", "-2", *extra]
    one, two = tmp_path / "one", tmp_path / "two"
    main([str(a) for a in run_args(tiny, data, one, 1, *base)])
    packing = ["--packing", "True"] if name.endswith("packed") else []
    run_cli(run_args(tiny, data, two, 2, *base, *packing, "--deepspeed", "scripts/zero3.json"),
            launcher=torchrun(2), env=DS_ENV)
    assert_same_run(one, two, steps=(1, 2))


def test_zero3_bf16_on_an_fp16_checkpoint(tiny, tmp_path):
    """--bf16 True under ZeRO-3 (2 CPU processes) on a checkpoint saved in fp16, as llava-hf's are: the model is
    partitioned in bf16 as it loads, DeepSpeed's bf16 mode keeps fp32 master weights in the optimizer (its
    checkpoint's flat groups), the loss is finite and the saved model is bf16 only."""
    import math

    import llava_voco
    from safetensors import safe_open

    fp16 = tmp_path / "fp16"
    llava_voco.VoCoLlavaForConditionalGeneration.from_pretrained(tiny.llava, dtype=torch.float16).save_pretrained(fp16)
    llava_voco.VoCoLlavaProcessor.from_pretrained(tiny.llava).save_pretrained(fp16)
    output_dir = tmp_path / "out"
    result = run_cli(["--model_name_or_path", fp16, "--voco_tokens", "1", "--bf16", "True",
                      "--deepspeed", "scripts/zero3.json"]
                     + common_args(tiny, output_dir, max_steps=2, save_steps=2, per_device_train_batch_size=2),
                     launcher=torchrun(2), env=DS_ENV)
    assert "weights in bfloat16 (DeepSpeed bf16 mode: fp32 master weights in the optimizer)" in result.stderr
    assert sorted(losses(output_dir)) == [1, 2] and all(math.isfinite(v) for v in losses(output_dir).values())
    for rank in (0, 1):
        state = torch.load(output_dir / f"checkpoint-2/global_step2/bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt",
                           map_location="cpu", weights_only=False)
        assert {t.dtype for t in state["optimizer_state_dict"]["fp32_flat_groups"]} == {torch.float32}
    with safe_open(output_dir / "model.safetensors", framework="pt") as handle:
        assert {str(handle.get_slice(key).get_dtype()) for key in handle.keys()} == {"BF16"}


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_distillation_on_two_processes_matches_one_process(tiny, mixed_data, tmp_path, zero):
    """--voco_distill_weight (KL against the same weights with the mask off) under ZeRO-2 / ZeRO-3 on 2 CPU
    processes == 1 process: each rank weighs its KL by its share of the global batch's answer tokens, as the
    Trainer does the language-model loss, so the losses, the logged terms and the weights are the single
    process's (the text-only rank's blank-image row included)."""
    distill = ["--voco_distill_weight", "1.0", "--voco_distill_temperature", "2.0"]
    one, two = tmp_path / "one", tmp_path / "two"
    main([str(a) for a in run_args(tiny, mixed_data, one, 1, *layout_a(tiny), "--voco_tokens", "1", *distill)])
    run_cli(run_args(tiny, mixed_data, two, 2, *layout_a(tiny), "--voco_tokens", "1", *distill,
                     "--deepspeed", f"scripts/{zero}.json"), launcher=torchrun(2), env=DS_ENV)
    assert_same_run(one, two)
    history = {path: {e["step"]: e for e in json.loads((path / "trainer_state.json").read_text())["log_history"]
                      if "loss" in e} for path in (one, two)}
    for step in (1, 2, 3, 4):
        assert history[two][step]["distill_kl"] == pytest.approx(history[one][step]["distill_kl"], rel=1e-3, abs=1e-6)
    assert any(history[one][step]["distill_kl"] > 1e-4 for step in (1, 2, 3, 4))
