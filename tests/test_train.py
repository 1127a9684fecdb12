"""The training entry (``python -m llava_voco.train``): LLaVA's command line plus ``--voco_tokens``.

A tiny Llama + CLIP is built here and saved in both of LLaVA's set-ups: (a) an LLM directory (with its
tokenizer) and a CLIP vision directory (with its image processor); (b) a full Llava checkpoint. The
images are real handwritten digits (scikit-learn) written as PNG files, the data LLaVA's JSON format.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor, CLIPVisionModel, LlamaForCausalLM

import llava_voco
from llava_voco.model.projectors import LinearProjector
from llava_voco.demo.tiny import build_tiny_llava
from llava_voco.train.arguments import TrainConfigError, build_parser, parse_args
from llava_voco.train.checks import refuse_flags_without_effect
from llava_voco.train.building import build_model_and_processor
from llava_voco.train.train import main

REPO = Path(__file__).resolve().parents[1]
WORDS = "zero one two three four five six seven eight nine".split()


# ---- fixtures: the tiny checkpoints in both layouts, images and data -------------------------------
def write_digit_images(folder: Path, count: int) -> list[int]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        gray = np.kron(digits.images[i] / 16.0 * 255.0, np.ones((2, 2))).astype(np.uint8)
        Image.fromarray(np.stack([gray] * 3, axis=-1)).save(folder / f"{i}.png")
    return [int(t) for t in digits.target[:count]]


def digit_samples(targets: list[int], text_only: int = 0) -> list[dict]:
    samples = [
        {"id": f"digit-{i}", "image": f"digits/{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is in the image?"},
            {"from": "gpt", "value": WORDS[target]},
        ]}
        for i, target in enumerate(targets)
    ]
    samples += [
        {"id": f"text-{i}", "conversations": [
            {"from": "human", "value": "What is the sum of the digits?"},
            {"from": "gpt", "value": WORDS[i % 10]},
        ]}
        for i in range(text_only)
    ]
    return samples


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("train_tiny")
    llava, processor = build_tiny_llava(root / "llava", seed=0)
    # Layout (a): the language model as a LlamaForCausalLM directory with the tokenizer ...
    llm = LlamaForCausalLM(llava.config.text_config)
    llm.model.load_state_dict(llava.model.language_model.state_dict())
    llm.lm_head.load_state_dict(llava.lm_head.state_dict())
    llm.save_pretrained(root / "llm")
    processor.tokenizer.save_pretrained(root / "llm")
    # ... and the vision tower as a CLIPVisionModel directory with a CLIP image processor.
    clip = CLIPVisionModel(llava.config.vision_config)
    clip.load_state_dict(llava.model.vision_tower.state_dict())
    clip.save_pretrained(root / "clip")
    processor.image_processor.save_pretrained(root / "clip")

    data = root / "data"
    targets = write_digit_images(data / "digits", 48)
    (data / "train.json").write_text(json.dumps(digit_samples(targets, text_only=16)))
    return SimpleNamespace(root=root, llava=root / "llava", llm=root / "llm", clip=root / "clip",
                           data_path=data / "train.json", image_folder=data, targets=targets)


def common_args(tiny, output_dir, **overrides) -> list[str]:
    """What every run here passes: CPU, no reporting, fixed seed, a loss logged at every step."""
    values = {
        "version": "v1", "data_path": tiny.data_path, "image_folder": tiny.image_folder, "output_dir": output_dir,
        "per_device_train_batch_size": 4, "learning_rate": 1e-3, "logging_steps": 1, "use_cpu": True,
        "report_to": "none", "seed": 0, "dataloader_num_workers": 0,
    }
    values.update(overrides)
    return [item for key, value in values.items() if value is not None for item in (f"--{key}", str(value))]


def layout_a(tiny) -> list[str]:
    return ["--model_name_or_path", str(tiny.llm), "--vision_tower", str(tiny.clip),
            "--mm_projector_type", "mlp2x_gelu", "--mm_vision_select_layer", "-2"]


def run_cli(args: list[str], launcher: list[str] | None = None, env: dict | None = None, cwd=REPO, timeout=900):
    command = (launcher or [sys.executable, "-m", "llava_voco.train"]) + [str(a) for a in args]
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    full_env.update(env or {})
    result = subprocess.run(command, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        noise = ("FutureWarning", "return func(*args, **kwargs)", "it/s]")
        stderr = "\n".join(line for line in result.stderr.splitlines() if not any(n in line for n in noise))
        raise AssertionError(f"exit status {result.returncode}: {shlex.join(command)}\n{result.stdout[-3000:]}\n"
                             f"{stderr[-8000:]}")
    return result


def losses(output_dir) -> dict[int, float]:
    history = json.loads((Path(output_dir) / "trainer_state.json").read_text())["log_history"]
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}


def reload_and_generate(output_dir, image: Image.Image):
    model = AutoModelForImageTextToText.from_pretrained(output_dir).eval()
    processor = AutoProcessor.from_pretrained(output_dir)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    batch = processor(images=image, text=text, return_tensors="pt")
    output = model.generate(**batch, max_new_tokens=4, do_sample=False)
    return model, processor, output[0, batch["input_ids"].shape[1]:]


# ---- the tiny end-to-end run from the command line ----------------------------------------------------
@pytest.fixture(scope="session")
def voco_run(tiny, tmp_path_factory):
    """30 steps of VoCo fine-tuning (k=1) from layout (a), from the shell; checkpoints every 10 steps."""
    output_dir = tmp_path_factory.mktemp("voco_run") / "out"
    args = layout_a(tiny) + ["--voco_tokens", "1"] + common_args(tiny, output_dir, max_steps=30, save_steps=10)
    run_cli(args)
    return SimpleNamespace(output_dir=output_dir, args=args)


def test_cli_voco_run_learns_and_reloads(tiny, voco_run):
    curve = losses(voco_run.output_dir)
    assert sorted(curve) == list(range(1, 31))
    first, last = np.mean([curve[s] for s in range(1, 6)]), np.mean([curve[s] for s in range(26, 31)])
    assert last < first - 0.5, curve  # measured: about 5.4 -> 4.1

    model, processor, new_tokens = reload_and_generate(voco_run.output_dir, Image.open(tiny.image_folder / "digits/0.png"))
    assert type(model) is llava_voco.VoCoLlavaForConditionalGeneration
    assert type(processor) is llava_voco.VoCoLlavaProcessor
    assert model.config.voco_tokens == 1 and processor.voco_tokens == 1
    assert model.config.voco_token_id == processor.tokenizer.convert_tokens_to_ids("<voco>")
    assert model.config.vision_feature_layer == -2 and model.config.mm_projector_type == "mlp2x_gelu"
    assert model.config.text_config.use_cache is True
    assert 1 <= len(new_tokens) <= 4
    # The vision tower was frozen: it is still the CLIP directory's.
    clip = CLIPVisionModel.from_pretrained(tiny.clip)
    for name, tensor in clip.state_dict().items():
        assert torch.equal(model.model.vision_tower.state_dict()[name], tensor), name


def test_resume_from_step_10_gives_the_same_losses(tiny, voco_run, tmp_path):
    """A run whose only checkpoint is step 10 resumes (LLaVA: from output_dir's checkpoint-*) and
    reproduces the uninterrupted run's losses at steps 11..30."""
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    shutil.copytree(voco_run.output_dir / "checkpoint-10", output_dir / "checkpoint-10")
    args = [a if a != str(voco_run.output_dir) else str(output_dir) for a in voco_run.args]
    result = run_cli(args)
    assert "resuming from" in result.stderr
    resumed, uninterrupted = losses(output_dir), losses(voco_run.output_dir)
    # Same to float noise (CPU BLAS may split sums differently under load); a resume that lost the
    # weights, the optimizer state or the data position is off by far more (measured: 0.9 at step 11).
    assert resumed[20] == pytest.approx(uninterrupted[20], rel=1e-5, abs=0)
    assert [resumed[s] for s in range(11, 31)] == pytest.approx([uninterrupted[s] for s in range(11, 31)], rel=1e-5, abs=0)


# ---- set-up (b), stages, LoRA (in-process: same entry, no interpreter start-up) --------------------
def test_voco_finetune_from_llava_checkpoint(tiny, tmp_path):
    # As VoCo-LLaMA's scripts do: the Llava checkpoint plus --vision_tower (LLaVA loads the tower's
    # weights from it; they must fit the checkpoint's tower).
    trainer = main(["--model_name_or_path", str(tiny.llava), "--voco_tokens", "2", "--vision_tower", str(tiny.clip),
                    "--mm_vision_select_layer", "-2"]
                   + common_args(tiny, tmp_path / "out", max_steps=3, save_strategy="no"))
    assert trainer.state.global_step == 3
    model, processor, _ = reload_and_generate(tmp_path / "out", Image.open(tiny.image_folder / "digits/1.png"))
    assert model.config.voco_tokens == 2 and processor.voco_tokens == 2
    assert "<voco>" in processor.tokenizer.all_special_tokens

    # The checkpoint now says k=2: another k is refused, naming both.
    with pytest.raises(TrainConfigError, match=r"--voco_tokens 1: .* saved with voco_tokens=2"):
        main(["--model_name_or_path", str(tmp_path / "out"), "--voco_tokens", "1"]
             + common_args(tiny, tmp_path / "again", max_steps=1))


def test_lower_bound_trains_without_the_mask_and_is_evaluated_with_it(tiny, tmp_path):
    """--voco_mask_in_training False (the VoCo paper's lower bound): while training, the VoCo model computes
    exactly what a causal model computes over the same tokens; the saved checkpoint compresses with the mask."""
    trainer = main(["--model_name_or_path", str(tiny.llava), "--voco_tokens", "1", "--voco_mask_in_training", "False"]
                   + common_args(tiny, tmp_path / "out", max_steps=2, save_strategy="no"))
    trained = trainer.model.eval()
    assert trainer.voco_mask is False  # every training forward ran with voco_mask=False
    batch = next(iter(trainer.get_train_dataloader()))
    batch = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "pixel_values", "labels")}
    with torch.no_grad():
        unmasked = trained(**batch, voco_mask=False)
        trained.config.voco_tokens = 0  # the same weights and tokens, no VoCo mask at all: plain causal attention
        causal = trained(**batch)
        trained.config.voco_tokens = 1
        masked = trained(**batch)
    torch.testing.assert_close(unmasked.logits, causal.logits, rtol=0, atol=0)
    assert (masked.logits - unmasked.logits).abs().max() > 1e-3
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "out")
    assert reloaded.config.voco_mask_mode == "paper"
    with torch.no_grad():  # the checkpoint runs with the mask
        torch.testing.assert_close(reloaded(**batch).logits, masked.logits, atol=1e-5, rtol=0)
    with pytest.raises(TrainConfigError, match="--voco_mask_in_training False"):
        main(["--model_name_or_path", str(tiny.llava), "--voco_mask_in_training", "False"]
             + common_args(tiny, tmp_path / "bad", max_steps=1))


def test_pretrain_stage_trains_and_saves_the_projector_only(tiny, tmp_path):
    out = tmp_path / "pretrain"
    args = layout_a(tiny) + ["--tune_mm_mlp_adapter", "True", "--version", "plain"]
    main(args + common_args(tiny, out, version="plain", max_steps=2, save_steps=1))

    projector = load_file(out / "mm_projector.safetensors")
    assert sorted(projector) == [f"model.multi_modal_projector.linear_{i}.{p}" for i in (1, 2) for p in ("bias", "weight")]
    assert not (out / "checkpoint-1" / "model.safetensors").exists()
    assert (out / "checkpoint-1" / "mm_projector.safetensors").exists()
    # The output still loads whole; only the projector moved.
    model = AutoModelForImageTextToText.from_pretrained(out)
    llm = LlamaForCausalLM.from_pretrained(tiny.llm)
    for name, tensor in llm.model.state_dict().items():
        assert torch.equal(model.model.language_model.state_dict()[name], tensor), name
    for name, tensor in projector.items():
        assert torch.equal(model.state_dict()[name], tensor), name

    # Resuming a projector-only checkpoint gives the uninterrupted run's loss at step 2.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(out / "checkpoint-1", resumed / "checkpoint-1")
    main(args + common_args(tiny, resumed, version="plain", max_steps=2, save_steps=1))
    assert losses(resumed)[2] == pytest.approx(losses(out)[2], rel=1e-5, abs=0)

    # The next stage reads it as --pretrain_mm_mlp_adapter, in our format or as LLaVA's mm_projector.bin.
    llava_names = {"model.mm_projector.0.weight": "linear_1.weight", "model.mm_projector.0.bias": "linear_1.bias",
                   "model.mm_projector.2.weight": "linear_2.weight", "model.mm_projector.2.bias": "linear_2.bias"}
    torch.save({k: projector[f"model.multi_modal_projector.{v}"] for k, v in llava_names.items()}, tmp_path / "mm_projector.bin")
    for adapter in (out / "mm_projector.safetensors", tmp_path / "mm_projector.bin"):
        model, _ = build_model_and_processor(*_model_and_training_args(
            layout_a(tiny) + ["--pretrain_mm_mlp_adapter", str(adapter)] + common_args(tiny, tmp_path / "x")))
        for ours in llava_names.values():
            assert torch.equal(model.model.multi_modal_projector.state_dict()[ours],
                               projector[f"model.multi_modal_projector.{ours}"]), (adapter, ours)


def _model_and_training_args(argv):
    model_args, _, training_args = parse_args(argv)
    return model_args, training_args


def test_lora_merges_on_save_and_projector_gets_its_own_lr(tiny, tmp_path):
    base_args = ["--model_name_or_path", str(tiny.llava), "--voco_tokens", "1", "--lora_enable", "True",
                 "--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0", "--mm_projector_lr", "2e-4",
                 "--group_by_modality_length", "True"]
    # --lora_merge_on_save False: the PEFT adapter (the projector included) is what is saved.
    trainer = main(base_args + ["--lora_merge_on_save", "False"]
                   + common_args(tiny, tmp_path / "adapter", max_steps=3, save_strategy="no"))
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert sorted(k for k in adapter if "trainable_tokens" in k) == [  # the <voco> rows travel with the adapter
        "base_model.model.lm_head.token_adapter.trainable_tokens_delta",
        "base_model.model.model.language_model.embed_tokens.token_adapter.trainable_tokens_delta"]

    # --mm_projector_lr: the projector's parameters, and only they, are in groups with that learning rate;
    # the other trained parameters are LoRA's and the <voco> rows' (PEFT trainable tokens).
    by_id = {id(p): n for n, p in trainer.model.named_parameters()}
    groups = {lr: [by_id[id(p)] for g in trainer.optimizer.param_groups if g["initial_lr"] == lr for p in g["params"]]
              for lr in (2e-4, 1e-3)}
    assert groups[2e-4] and all("multi_modal_projector" in n for n in groups[2e-4])
    assert groups[1e-3] and all("lora_" in n or "trainable_tokens_delta" in n for n in groups[1e-3])
    assert [n for n in groups[1e-3] if "trainable_tokens_delta" in n]
    assert sum(len(g["params"]) for g in trainer.optimizer.param_groups) == len(groups[2e-4]) + len(groups[1e-3])
    # The logged learning_rate is the main one (LoRA's), not the projector's, which is logged under its own name.
    logged_rates = [(e["learning_rate"], e["learning_rate_mm_projector"]) for e in trainer.state.log_history if "loss" in e]
    assert logged_rates[0] == (1e-3, 2e-4) and len(logged_rates) == 3, logged_rates
    # --group_by_modality_length: each batch holds one modality (16 batches of 4: 12 image, 4 text-only).
    image_id = trainer.model.config.image_token_id
    rows_with_image = [int((b["input_ids"] == image_id).any(dim=1).sum()) for b in trainer.get_train_dataloader()]
    assert sorted(rows_with_image) == [0] * 4 + [4] * 12, (rows_with_image, trainer.train_dataset.modality_lengths)

    # Merged on save (the default): a plain checkpoint with no LoRA keys; the LLM and projector moved.
    main(base_args + common_args(tiny, tmp_path / "merged", max_steps=3, save_strategy="no"))
    assert not [k for k in load_file(tmp_path / "merged" / "model.safetensors") if "lora" in k]
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged").eval()
    base, _ = llava_voco.add_voco_to_llava(tiny.llava, voco_tokens=1)
    for name in ("model.language_model.layers.0.self_attn.q_proj.weight", "model.multi_modal_projector.linear_1.weight"):
        assert not torch.equal(merged.state_dict()[name], base.state_dict()[name]), name
    assert torch.equal(merged.state_dict()["model.language_model.norm.weight"], base.state_dict()["model.language_model.norm.weight"])

    # The adapter on its base gives the merged model's logits (same seed, same steps).
    from peft import PeftModel

    adapted = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "merged")
    batch = processor(images=Image.open(tiny.image_folder / "digits/2.png"),
                      text="USER: <image>\nWhat is in the image? ASSISTANT:", return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(adapted(**batch).logits, merged(**batch).logits, atol=1e-5, rtol=1e-5)


def test_linear_projector_cls_patch_and_unfrozen_vision_tower(tiny, tmp_path):
    """LLaVA-1's linear projector (a checkpoint stock Llava cannot read, so it keeps our model type even
    with VoCo off), --mm_vision_select_feature cls_patch (CLS kept: 17 tokens per image), and
    --unfreeze_mm_vision_tower with its own learning rate."""
    args = ["--model_name_or_path", str(tiny.llm), "--vision_tower", str(tiny.clip), "--mm_projector_type", "linear",
            "--mm_vision_select_feature", "cls_patch", "--unfreeze_mm_vision_tower", "True",
            "--mm_vision_tower_lr", "1e-3"]
    trainer = main(args + common_args(tiny, tmp_path / "out", max_steps=2, save_strategy="no", learning_rate=1e-4))
    assert {g["initial_lr"] for g in trainer.optimizer.param_groups} == {1e-3, 1e-4}
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "voco_llava" and config["mm_projector_type"] == "linear"
    assert config["vision_feature_layer"] == -1  # LLaVA's default --mm_vision_select_layer
    assert config["vision_feature_select_strategy"] == "full" and config["image_seq_length"] == 17
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "out")
    assert isinstance(model.model.multi_modal_projector, LinearProjector)
    clip = CLIPVisionModel.from_pretrained(tiny.clip)
    name = "encoder.layers.0.mlp.fc1.weight"
    assert not torch.equal(model.model.vision_tower.state_dict()[name], clip.state_dict()[name])


def test_vision_token_pooling_mean_is_one_token_per_image(tiny, tmp_path):
    """--vision_token_pooling mean (the VoCo paper's pooling baseline): one <image> token per image, whose
    embedding is the projector applied to the mean of the patch features; it saves as our type (stock Llava
    would expand 16 tokens) and reloads with the same logits; a second run from it keeps the pooling."""
    args = layout_a(tiny) + ["--vision_token_pooling", "mean"]
    main(args + common_args(tiny, tmp_path / "out", max_steps=2, save_strategy="no"))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "voco_llava" and config["vision_token_pooling"] == "mean"
    assert config["image_seq_length"] == 1
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "out").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "out")
    image = Image.open(tiny.image_folder / "digits" / "0.png")
    batch = processor(images=image, text="<image>\nWhat is in the image?", return_tensors="pt")
    assert int((batch["input_ids"] == model.config.image_token_id).sum()) == 1
    with torch.no_grad():
        patch_features = model.model.vision_patch_features(batch["pixel_values"])  # [1, 16, C]
        expected = model.model.multi_modal_projector(patch_features.mean(dim=1))  # [1, D]
        (encoded,) = model.model.encode_images(batch["pixel_values"])
        logits = model(**batch).logits
    assert encoded.shape == (1, model.config.text_config.hidden_size)
    torch.testing.assert_close(encoded, expected, rtol=0, atol=1e-6)
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, logits)
    # finetuning from the pooled checkpoint (set-up b) keeps its pooling; asking for another is refused
    main(["--model_name_or_path", str(tmp_path / "out")] + common_args(tiny, tmp_path / "ft", max_steps=1, save_strategy="no"))
    assert json.loads((tmp_path / "ft" / "config.json").read_text())["vision_token_pooling"] == "mean"
    with pytest.raises(TrainConfigError, match="vision_token_pooling"):
        main(["--model_name_or_path", str(tmp_path / "out"), "--vision_token_pooling", "grid:2"]
             + common_args(tiny, tmp_path / "ft2", max_steps=1))
    with pytest.raises(TrainConfigError, match="malformed"):
        main(layout_a(tiny) + ["--vision_token_pooling", "grid"] + common_args(tiny, tmp_path / "bad", max_steps=1))


def test_freeze_backbone(tiny, tmp_path):
    """--freeze_backbone: the LLM body stays, lm_head and the projector train (as in LLaVA)."""
    main(["--model_name_or_path", str(tiny.llava), "--freeze_backbone", "True"]
         + common_args(tiny, tmp_path / "out", max_steps=2, save_strategy="no"))
    trained = AutoModelForImageTextToText.from_pretrained(tmp_path / "out").state_dict()
    start = AutoModelForImageTextToText.from_pretrained(tiny.llava).state_dict()
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "llava"  # VoCo off
    for name, tensor in start.items():
        changed = not torch.equal(trained[name], tensor)
        assert changed == (name.startswith("lm_head") or "multi_modal_projector" in name), name


# ---- wandb ---------------------------------------------------------------------------------------------
def test_wandb_gets_the_compression_stats(tiny, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    samples = digit_samples(tiny.targets[:4])
    samples.insert(1, {"id": "missing", "image": "digits/nope.png",
                       "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "one"}]})
    samples.append({"id": "long", "image": "digits/5.png", "conversations": [  # its second reply is cut
        {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "hello"},
        {"from": "human", "value": "<image>\nDescribe the image."},
        {"from": "gpt", "value": " ".join(WORDS * 20)}]})
    data_path = tmp_path / "data.json"
    data_path.write_text(json.dumps(samples))
    args = layout_a(tiny) + ["--voco_tokens", "1", "--skip_bad_samples", "True", "--lazy_preprocess", "True"]
    main(args + common_args(tiny, tmp_path / "out", data_path=data_path, per_device_train_batch_size=2,
                            max_steps=3, save_strategy="no", report_to="wandb", model_max_length=96))
    try:
        summary = dict(wandb.run.summary)
    finally:
        wandb.finish()
    assert summary["train/vision_tokens_per_sample"] == 16.0  # the last batch: two image samples
    assert summary["train/voco_tokens_per_sample"] == 1.0
    assert summary["train/compression_ratio"] == 16.0
    assert 0.0 < summary["train/image_token_share"] < 1.0
    assert summary["train/samples_skipped"] >= 1  # the missing image
    assert summary["train/samples_truncated"] >= 1  # the long answer
    assert summary["train/replies_dropped"] >= 1  # ... which is not learned in part
    assert "train/loss" in summary


# ---- errors and refused flags ------------------------------------------------------------------------
REFUSED = [
    (["--mm_use_im_start_end", "True"], "--mm_use_im_start_end True: .*no effect"),
    (["--mm_use_im_patch_token", "True"], "--mm_use_im_patch_token True: .*no effect"),
    (["--bits", "4"], "--bits 4: .*bitsandbytes"),
    (["--double_quant", "True"], "--double_quant: only .*--bits 4/8"),
    (["--quant_type", "nf4"], "--quant_type: only"),
    (["--mpt_attn_impl", "triton"], "--mpt_attn_impl: MPT"),
    (["--lora_weight_path", "x"], "--lora_weight_path: LLaVA declares it but never reads it"),
    (["--mm_patch_merge_type", "spatial_unpad"], "--mm_patch_merge_type spatial_unpad"),
    (["--image_grid_pinpoints", "[[336,672]]"], "--image_grid_pinpoints: LLaVA-NeXT"),
    (["--mm_projector_type", "qformer"], "--mm_projector_type qformer: supported: linear, mlp2x_gelu"),
    (["--mm_vision_select_feature", "cls"], "--mm_vision_select_feature cls: must be patch or cls_patch"),
    (["--tune_mm_mlp_adapter", "True", "--freeze_mm_mlp_adapter", "True"], "nothing would train"),
    (["--tune_mm_mlp_adapter", "True", "--lora_enable", "True"], "--lora_enable True: the pretrain stage"),
    (["--lora_enable", "True", "--freeze_backbone", "True"], "--freeze_backbone True: with --lora_enable"),
    (["--freeze_mm_mlp_adapter", "True", "--mm_projector_lr", "1e-4"], "--mm_projector_lr: the projector is frozen"),
    (["--mm_vision_tower_lr", "1e-5"], "--mm_vision_tower_lr: the vision tower is frozen"),
    (["--lora_merge_on_save", "False"], "--lora_merge_on_save False: only .*--lora_enable"),
    (["--voco_tokens", "-1"], "--voco_tokens -1: must be >= 0"),
]


@pytest.mark.parametrize("extra,message", REFUSED, ids=[" ".join(e) for e, _ in REFUSED])
def test_flags_without_effect_are_refused(tiny, tmp_path, extra, message):
    model_args, data_args, training_args = parse_args(layout_a(tiny) + extra + common_args(tiny, tmp_path))
    with pytest.raises(TrainConfigError, match=message):
        refuse_flags_without_effect(model_args, data_args, training_args)


def test_model_set_up_errors(tiny, tmp_path):
    base = common_args(tiny, tmp_path / "out")
    with pytest.raises(TrainConfigError, match="is not a Llava checkpoint, so it needs --vision_tower"):
        main(["--model_name_or_path", str(tiny.llm)] + base)
    with pytest.raises(TrainConfigError, match="--mm_projector_type linear: .* has a mlp2x_gelu projector"):
        main(["--model_name_or_path", str(tiny.llava), "--mm_projector_type", "linear"] + base)
    torch.save({"model.mm_projector.weight": torch.zeros(64, 32), "model.mm_projector.bias": torch.zeros(64)},
               tmp_path / "linear.bin")
    with pytest.raises(ValueError, match="linear.bin: 'model.mm_projector.weight' is not a weight of LLaVA's 'mlp2x_gelu'"):
        main(layout_a(tiny) + ["--pretrain_mm_mlp_adapter", str(tmp_path / "linear.bin")] + base)
    with pytest.raises(TrainConfigError, match="--pretrain_mm_mlp_adapter .*nope.bin: no such file"):
        main(layout_a(tiny) + ["--pretrain_mm_mlp_adapter", str(tmp_path / "nope.bin")] + base)
    with pytest.raises(ValueError, match="nonexistent_template"):
        main(layout_a(tiny) + common_args(tiny, tmp_path / "out", version="nonexistent_template"))


def test_cli_reports_refusals_as_errors(tiny, tmp_path):
    command = [sys.executable, "-m", "llava_voco.train"] + layout_a(tiny) + ["--mm_use_im_start_end", "True"]
    command += common_args(tiny, tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([str(c) for c in command], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "llava-voco-train: error: --mm_use_im_start_end True" in result.stderr


# ---- scripts -----------------------------------------------------------------------------------------
def script_flags(path: Path) -> list[str]:
    """The arguments a script passes to our entry (line continuations joined, $vars given dummy values)."""
    text = path.read_text().replace("\\\n", " ")
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        for marker in ("llava_voco/train/train.py", "llava_voco.train"):
            if marker in words:
                args = words[words.index(marker) + 1:]
                return [("/tmp/dummy" if a.startswith("$") else a) for a in args]
    raise AssertionError(f"{path} does not call the training entry")


SCRIPTS = sorted((REPO / "scripts").glob("*.sh"))


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_scripts_name_only_real_flags(script):
    args = script_flags(script)
    parser = build_parser()
    namespace, unknown = parser.parse_known_args(args)
    assert not unknown, f"{script.name}: flags the entry does not have: {unknown}"
    assert namespace.report_to == ["wandb"] or namespace.report_to == "wandb"
    ds_config = REPO / namespace.deepspeed
    assert json.loads(ds_config.read_text())["zero_optimization"]["stage"] in (2, 3)


def test_scripts_exist():
    assert {s.name for s in SCRIPTS} >= {"pretrain.sh", "finetune.sh", "finetune_voco.sh", "finetune_lora.sh"}
    for name in ("zero2.json", "zero3.json", "zero3_offload.json"):
        config = json.loads((REPO / "scripts" / name).read_text())
        assert config["train_micro_batch_size_per_gpu"] == "auto"


def test_console_script_is_declared():
    import configparser
    import importlib

    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    scripts = dict(line.split(" = ") for line in config["options.entry_points"]["console_scripts"].strip().splitlines())
    module, function = scripts["llava-voco-train"].split(":")
    assert getattr(importlib.import_module(module), function) is __import__("llava_voco.train.train", fromlist=["cli"]).cli


# ---- LLaMA-VID and video through the same entry ---------------------------------------------------------
def test_llamavid_run_on_images_and_videos_learns_and_reloads(tiny, tmp_path):
    """--mm_projector_type llamavid, set-up (a), image and video samples (a real mp4 and a frame folder):
    the loss falls, the text decoder trains (or stays frozen with --freeze_text_decoder), the output
    reloads with its text decoder tokenizer and answers."""
    from llava_voco.demo.tiny import train_wordpiece_tokenizer
    from test_video import write_video

    bert_dir = tmp_path / "bert"
    train_wordpiece_tokenizer().save_pretrained(bert_dir)
    qformer = tmp_path / "qformer.json"
    qformer.write_text(json.dumps({"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4,
                                   "intermediate_size": 64}))
    videos = tiny.image_folder / "videos"
    videos.mkdir(exist_ok=True)
    write_video(videos / "clip.mp4", frames=8, rate=4)  # 2 frames at 1 fps
    frames = videos / "frames"
    frames.mkdir(exist_ok=True)
    for n in range(3):
        shutil.copy(tiny.image_folder / f"digits/{n}.png", frames / f"{n:03d}.png")
    samples = json.loads(tiny.data_path.read_text())[:24]
    samples += [{"id": f"video-{i}", "video": "videos/clip.mp4" if i % 2 else "videos/frames", "conversations": [
        {"from": "human", "value": "<video>\nWhat is in the clip?"}, {"from": "gpt", "value": WORDS[i % 10]}]}
        for i in range(8)]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(samples))
    llamavid = ["--mm_projector_type", "llamavid", "--text_decoder_tokenizer", bert_dir, "--text_decoder_config", qformer,
                "--num_query", "4", "--compress_type", "grid:2", "--video_compress_type", "mean"]
    base = ["--model_name_or_path", str(tiny.llm), "--vision_tower", str(tiny.clip), "--mm_vision_select_layer", "-2"]

    output_dir = tmp_path / "out"
    run_cli(base + llamavid + common_args(tiny, output_dir, data_path=data, max_steps=20, save_steps=100))
    curve = losses(output_dir)
    assert np.mean([curve[s] for s in range(16, 21)]) < np.mean([curve[s] for s in range(1, 6)]) - 0.3, curve

    model = AutoModelForImageTextToText.from_pretrained(output_dir).eval()
    processor = AutoProcessor.from_pretrained(output_dir)
    assert model.config.mm_projector_type == "llamavid" and processor.text_decoder_tokenizer is not None
    fresh = llava_voco.model.projectors.llamavid.build_llamavid_projector(model.config)
    trained = model.model.multi_modal_projector.text_decoder.state_dict()
    assert any(not torch.equal(trained[k], v) for k, v in fresh.text_decoder.state_dict().items())
    batch = processor(images=[Image.open(tiny.image_folder / "digits/0.png")], text="USER: <image>\nWhat is in the image? ASSISTANT:",
                      instructions=["What is in the image?"], return_tensors="pt")
    assert int((batch["input_ids"] == model.config.image_token_id).sum()) == 1 + 4
    assert model.config.image_seq_length == 1 + 4  # what an image becomes (tokens_per_image)
    assert model.generate(**batch, max_new_tokens=3, do_sample=False).shape[1] > batch["input_ids"].shape[1]

    # training on from the checkpoint (set-up (b)) keeps its projector: the same text decoder and weights
    model_args, _, training_args = parse_args([str(arg) for arg in (
        ["--model_name_or_path", output_dir] + common_args(tiny, tmp_path / "again", data_path=data))])
    again, again_processor = build_model_and_processor(model_args, training_args)
    assert again.config.llamavid_qformer == model.config.llamavid_qformer and again_processor.reads_instruction
    saved = model.model.multi_modal_projector.state_dict()
    assert all(torch.equal(value, saved[name]) for name, value in again.model.multi_modal_projector.state_dict().items())

    # --freeze_text_decoder (LLaMA-VID's ..._freeze, stage 1): the Q-Former, its input LayerNorm and queries stay as
    # they are, the projections still train; --freeze_context_token (..._freeze_all): only the content projector
    from llava_voco.train.trainable import set_trainable

    model_args, data_args, training_args = parse_args([str(arg) for arg in (
        base + llamavid + ["--freeze_text_decoder", "True"] + common_args(tiny, tmp_path / "frozen", data_path=data))])
    model, _ = build_model_and_processor(model_args, training_args)
    model = set_trainable(model, model_args, training_args)
    projector = model.model.multi_modal_projector
    assert not any(p.requires_grad for p in projector.text_decoder.parameters())
    assert not projector.query_tokens.requires_grad and not projector.text_decoder_input_norm.weight.requires_grad
    assert projector.query_projection.weight.requires_grad and projector.context_projection.weight.requires_grad
    model_args, data_args, training_args = parse_args([str(arg) for arg in (
        base + llamavid + ["--freeze_context_token", "True"] + common_args(tiny, tmp_path / "frozen_all", data_path=data))])
    model = set_trainable(build_model_and_processor(model_args, training_args)[0], model_args, training_args)
    projector = model.model.multi_modal_projector
    assert {name.split(".")[0] for name, p in projector.named_parameters() if p.requires_grad} == {"content_projector"}


def test_llamavid_flags_need_llamavid(tiny, tmp_path):
    with pytest.raises(TrainConfigError, match="only applies with --mm_projector_type llamavid"):
        refuse_flags_without_effect(*parse_args(layout_a(tiny) + ["--compress_type", "mean"] + common_args(tiny, tmp_path)))


def test_llamavid_text_decoder_from_instructblip(tiny, tmp_path):
    from transformers import InstructBlipConfig, InstructBlipForConditionalGeneration

    from llava_voco.demo.tiny import train_wordpiece_tokenizer

    bert = train_wordpiece_tokenizer()
    bert.save_pretrained(tmp_path / "bert")
    vision_width = CLIPVisionModel.from_pretrained(tiny.clip).config.hidden_size
    config = InstructBlipConfig(
        vision_config={"hidden_size": vision_width, "intermediate_size": 64, "num_hidden_layers": 1,
                       "num_attention_heads": 4, "image_size": 16, "patch_size": 4},
        qformer_config={"vocab_size": len(bert), "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4,
                        "intermediate_size": 64, "encoder_hidden_size": vision_width},
        text_config={"model_type": "opt", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4,
                     "ffn_dim": 64, "vocab_size": 100, "word_embed_proj_dim": 32},
        num_query_tokens=4,
    )
    instructblip = InstructBlipForConditionalGeneration(config)
    instructblip.save_pretrained(tmp_path / "instructblip")
    args = ["--model_name_or_path", tiny.llm, "--vision_tower", tiny.clip, "--mm_projector_type", "llamavid",
            "--text_decoder_tokenizer", tmp_path / "bert", "--text_decoder_path", tmp_path / "instructblip",
            "--num_query", "4"] + common_args(tiny, tmp_path / "out")
    model_args, _, training_args = parse_args([str(a) for a in args])
    model, processor = build_model_and_processor(model_args, training_args)
    decoder = model.model.multi_modal_projector.text_decoder.state_dict()
    for name, tensor in instructblip.qformer.state_dict().items():
        assert torch.equal(decoder[name], tensor), name
    wrong = [str(a) for a in args[:-len(common_args(tiny, tmp_path / "out"))]]
    wrong[wrong.index("4")] = "8"  # --num_query 8: InstructBLIP has 4 queries
    model_args, _, training_args = parse_args(wrong + common_args(tiny, tmp_path / "out"))
    with pytest.raises(TrainConfigError, match="--text_decoder_path: .*query_tokens"):
        build_model_and_processor(model_args, training_args)


def test_the_checkpoint_carries_its_prompt_format(tiny, tmp_path, capsys):
    """The train entry saves ``--version`` as the processor's chat template and records its name; the engine and
    the eval entry prompt with it by default (they prompted with v1 whatever the model learned)."""
    from llava_voco.conversation import get_template
    from llava_voco.engine import InferenceEngine
    from llava_voco.eval import model_vqa

    output_dir = tmp_path / "out"
    run_cli(layout_a(tiny) + ["--voco_tokens", "1"] + common_args(tiny, output_dir, max_steps=1,
                                                                   version="llava_llama_2"))
    processor = AutoProcessor.from_pretrained(output_dir)
    template = get_template("llava_llama_2")
    assert processor.conversation_version == "llava_llama_2"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is the sum?"}]},
                {"role": "assistant", "content": "7"}, {"role": "user", "content": "And the largest?"}]
    turns = [("human", "<image>\nWhat is the sum?"), ("gpt", "7"), ("human", "And the largest?")]
    asked = template.render(turns, 1, add_generation_prompt=True).text
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == asked
    assert InferenceEngine.load(str(output_dir)).template is template

    questions = tmp_path / "questions.jsonl"
    questions.write_text(json.dumps({"question_id": 0, "image": "digits/0.png", "text": "What is the sum?"}) + "\n")
    answers = tmp_path / "answers.jsonl"
    model_vqa.main(["--model-path", str(output_dir), "--question-file", str(questions), "--image-folder",
                    str(tiny.image_folder), "--answers-file", str(answers), "--max-new-tokens", "2"])
    record = json.loads(answers.read_text())
    assert record["prompt"] == template.render(turns[:1], 1, add_generation_prompt=True).text
