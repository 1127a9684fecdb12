"""The LLaVA side of tests/test_patches.py: runs in the virtual environment with LLaVA's pinned stack
(transformers 4.36 / 4.37, created by the test under .cache/patches/), with the patched LLaVA tree on
PYTHONPATH. Never imported by llava-voco: it imports LLaVA's ``llava`` package.

    python llava_side.py logits WORKDIR   # spec.json, weights/inputs.safetensors in; outputs.safetensors out
    python llava_side.py train WORKDIR    # a tiny base model and data set, then llava/train/train.py
    python llava_side.py vqa WORKDIR      # llava/eval/model_vqa.py on the trained model, with and without
                                          # --voco-cache

Tensors travel through safetensors files; everything else through JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file


def build_clip(directory: Path, sizes: dict, seed: int = 0) -> None:
    """A random CLIP vision tower and its image processor, where LLaVA's CLIPVisionTower loads them from."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(
        hidden_size=sizes["vision_hidden"], intermediate_size=sizes["vision_hidden"] * 2,
        num_hidden_layers=sizes["vision_layers"], num_attention_heads=sizes["heads"],
        image_size=sizes["image_size"], patch_size=sizes["patch_size"], projection_dim=sizes["vision_hidden"],
    )
    torch.manual_seed(seed)
    CLIPVisionModel(config).save_pretrained(directory)
    CLIPImageProcessor(
        size={"shortest_edge": sizes["image_size"]},
        crop_size={"height": sizes["image_size"], "width": sizes["image_size"]},
    ).save_pretrained(directory)


def llava_config(spec: dict, clip_dir: Path, attn_implementation: str, mode: str):
    from llava.model import LlavaConfig

    sizes = spec["sizes"]
    return LlavaConfig(
        vocab_size=spec["vocab_size"], hidden_size=sizes["text_hidden"], intermediate_size=sizes["text_hidden"] * 2,
        num_hidden_layers=sizes["text_layers"], num_attention_heads=sizes["heads"],
        num_key_value_heads=sizes["kv_heads"], max_position_embeddings=1024,
        bos_token_id=spec["bos_token_id"], eos_token_id=spec["eos_token_id"], pad_token_id=spec["pad_token_id"],
        mm_vision_tower=str(clip_dir), mm_vision_select_layer=-2, mm_vision_select_feature="patch",
        mm_projector_type="mlp2x_gelu", mm_hidden_size=sizes["vision_hidden"], mm_patch_merge_type="flat",
        tokenizer_padding_side="right", use_mm_proj=True,
        voco_tokens=spec["voco_tokens"], voco_token_id=spec["voco_token_id"], voco_mask_mode=mode,
        attn_implementation=attn_implementation,
    )


def logits(workdir: Path) -> None:
    """LLaVA's logits for the same weights and inputs as llava-voco's model, per attention implementation and
    mask mode; plus compress-once (llava/model/voco_compress.py) against the full forward and generate."""
    from llava.model import LlavaLlamaForCausalLM
    from llava.model.voco_compress import (
        answer,
        compress,
        split_at_last_image,
        text_logits,
    )

    spec = json.loads((workdir / "spec.json").read_text())
    weights = load_file(workdir / "weights.safetensors")
    inputs = load_file(workdir / "inputs.safetensors")
    clip_dir = workdir / "clip"
    build_clip(clip_dir, spec["sizes"])
    outputs, meta = {}, {"transformers": transformers.__version__, "torch": torch.__version__, "attention": {}}
    for implementation in ("eager", "sdpa"):
        for mode in ("paper", "official"):
            model = LlavaLlamaForCausalLM(llava_config(spec, clip_dir, implementation, mode))
            model.get_model().get_vision_tower().load_model()
            model.load_state_dict(weights, strict=True)
            model.eval()
            meta["attention"][implementation] = type(model.model.layers[0].self_attn).__name__
            with torch.no_grad():
                out = model(
                    input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                    images=inputs["pixel_values"], labels=inputs["labels"],
                )
            outputs[f"logits_{implementation}_{mode}"] = out.logits
            outputs[f"loss_{implementation}_{mode}"] = out.loss.reshape(1)

            # compress once: row 0 alone, [prefix, image] prefilled and its vision keys dropped, the text after
            # it from the compressed cache, against the full forward of the whole row
            length = int(inputs["attention_mask"][0].sum())
            row = inputs["input_ids"][:1, :length]
            image = inputs["pixel_values"][:1]
            head, tail = split_at_last_image(row)
            with torch.no_grad():
                full = model(input_ids=row, images=image).logits
                compressed = compress(model, head, images=image)
                from_cache = text_logits(model, compressed, tail)
            outputs[f"full_text_logits_{implementation}_{mode}"] = full[:, -tail.shape[1]:]
            outputs[f"compressed_text_logits_{implementation}_{mode}"] = from_cache
            meta[f"cache_positions_{implementation}_{mode}"] = compressed.past_key_values[0][0].shape[2]
            meta[f"next_position_{implementation}_{mode}"] = compressed.next_position
            # generate() over the full sequence (VoCo mask at every step) and answer() from the cache, greedy
            with torch.no_grad():
                generated = model.generate(
                    row, images=image, do_sample=False, max_new_tokens=6, eos_token_id=-1, pad_token_id=0,
                )
                answered = answer(model, compressed, tail, max_new_tokens=6, temperature=0, eos_token_id=-1)
            outputs[f"generate_{implementation}_{mode}"] = generated[:, -6:]
            outputs[f"answer_{implementation}_{mode}"] = answered
    save_file({k: v.contiguous() for k, v in outputs.items()}, workdir / "outputs.safetensors")
    (workdir / "meta.json").write_text(json.dumps(meta))


# ---------------------------------------------------------------------------------------------- training

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
CORPUS = [
    "A chat between a curious human and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    "USER: What colour is the picture? ASSISTANT: red green blue yellow",
    "Which colour fills the image? Describe the image. It is red. It is green. It is blue. It is yellow.",
]


def build_base_model(directory: Path, clip_dir: Path) -> None:
    """A random tiny LLaMA with a real SentencePiece tokenizer (LlamaTokenizer, use_fast=False as LLaVA
    loads it), and a tiny CLIP, in the layout LLaVA's train.py reads."""
    import io

    import sentencepiece as spm
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    model_proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20), model_writer=model_proto, vocab_size=400, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1, minloglevel=2,
    )
    (directory / "tokenizer.model").write_bytes(model_proto.getvalue())
    tokenizer = LlamaTokenizer(vocab_file=str(directory / "tokenizer.model"), legacy=True)
    tokenizer.save_pretrained(directory)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    build_clip(clip_dir, {"vision_hidden": 32, "vision_layers": 2, "heads": 4, "image_size": 16, "patch_size": 4})


def build_data(directory: Path, samples: int = 16) -> Path:
    """Solid-colour 16 x 16 images, one question each (LLaVA's JSON format)."""
    from PIL import Image

    (directory / "images").mkdir(parents=True, exist_ok=True)
    names = sorted(COLOURS)
    records = []
    for i in range(samples):
        colour = names[i % len(names)]
        Image.new("RGB", (16, 16), COLOURS[colour]).save(directory / "images" / f"{i}.png")
        records.append({
            "id": str(i), "image": f"{i}.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat colour is the picture?"},
                {"from": "gpt", "value": f"It is {colour}."},
            ],
        })
    path = directory / "data.json"
    path.write_text(json.dumps(records))
    return path


def train(workdir: Path) -> None:
    """LLaVA's own llava/train/train.py, a few steps on CPU with --voco_tokens 1; writes train_result.json."""
    import llava

    base, clip = workdir / "base", workdir / "clip"
    build_base_model(base, clip)
    data = build_data(workdir / "data")
    output = workdir / "llava-voco-tiny"  # load_pretrained_model picks LLaVA's class by "llava" in the name
    steps = int(os.environ.get("LLAVA_SIDE_TRAIN_STEPS", "12"))
    command = [
        sys.executable, str(Path(llava.__file__).parent / "train" / "train.py"),
        "--model_name_or_path", str(base), "--version", "v1",
        "--data_path", str(data), "--image_folder", str(workdir / "data" / "images"),
        "--vision_tower", str(clip), "--mm_projector_type", "mlp2x_gelu",
        "--mm_vision_select_layer", "-2", "--mm_use_im_start_end", "False", "--mm_use_im_patch_token", "False",
        "--image_aspect_ratio", "pad", "--group_by_modality_length", "False",
        "--voco_tokens", "1", "--voco_mask_mode", "paper",
        "--bf16", "False", "--fp16", "False", "--use_cpu", "True",
        "--output_dir", str(output), "--max_steps", str(steps), "--per_device_train_batch_size", "4",
        "--gradient_accumulation_steps", "1", "--learning_rate", "3e-3", "--weight_decay", "0.",
        "--warmup_ratio", "0", "--lr_scheduler_type", "constant", "--logging_steps", "1",
        "--save_strategy", "no", "--model_max_length", "128", "--gradient_checkpointing", "False",
        "--dataloader_num_workers", "0", "--lazy_preprocess", "True", "--report_to", "none", "--seed", "0",
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False, env={**os.environ, "WANDB_DISABLED": "true"})
    (workdir / "train_stdout.txt").write_text(result.stdout + "\n---- stderr ----\n" + result.stderr)
    if result.returncode != 0:
        raise SystemExit(f"train.py failed ({result.returncode}):\n{result.stderr[-4000:]}")
    state = json.loads((output / "trainer_state.json").read_text())
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    saved = json.loads((output / "config.json").read_text())
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(output, use_fast=False)
    report = {
        "command": command[1:],
        "losses": losses,
        "config": {k: saved.get(k) for k in ("voco_tokens", "voco_mask_mode", "voco_token_id", "vocab_size")},
        "tokenizer_voco_id": tokenizer.convert_tokens_to_ids("<voco>"),
        "tokenization_mismatch": "tokenization mismatch" in result.stdout + result.stderr,
    }
    (workdir / "train_result.json").write_text(json.dumps(report))


def vqa(workdir: Path) -> None:
    """LLaVA's llava/eval/model_vqa.py (run as __main__, its own argument parser) on the model train()
    saved, greedy, with and without --voco-cache.

    model_vqa.py is a GPU script (.cuda(), .half(), a float16 model). Here only, on CPU: Tensor.cuda and
    Tensor.half return the tensor itself and the loaded model is cast to float32. Writes vqa_result.json:
    both answer files and how many times an image was compressed."""
    import runpy

    from llava.model import builder, voco_compress

    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.Tensor.half = lambda self, *args, **kwargs: self
    load = builder.load_pretrained_model

    def load_on_cpu(*args, **kwargs):
        tokenizer, model, image_processor, context_len = load(*args, device="cpu", **kwargs)
        return tokenizer, model.float(), image_processor, context_len

    builder.load_pretrained_model = load_on_cpu
    compressions = []
    compress = voco_compress.compress

    def counting_compress(*args, **kwargs):
        compressions.append(1)
        return compress(*args, **kwargs)

    voco_compress.compress = counting_compress
    questions = workdir / "questions.jsonl"
    questions.write_text("".join(json.dumps(q) + "\n" for q in [
        {"question_id": 0, "image": "0.png", "text": "What colour is the picture?"},
        {"question_id": 1, "image": "0.png", "text": "Which colour fills the image?"},
        {"question_id": 2, "image": "1.png", "text": "What colour is the picture?"},
    ]))
    result = {}
    for name, extra in (("generate", []), ("voco_cache", ["--voco-cache"])):
        answers = workdir / f"answers_{name}.jsonl"
        sys.argv = [
            "model_vqa.py", "--model-path", str(workdir / "llava-voco-tiny"), "--image-folder",
            str(workdir / "data" / "images"), "--question-file", str(questions), "--answers-file", str(answers),
            "--conv-mode", "vicuna_v1", "--temperature", "0", *extra,
        ]
        runpy.run_module("llava.eval.model_vqa", run_name="__main__")
        result[name] = [json.loads(line)["text"] for line in answers.read_text().splitlines()]
    result["compressions"] = len(compressions)
    (workdir / "vqa_result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    command, workdir = sys.argv[1], Path(sys.argv[2])
    {"logits": logits, "train": train, "vqa": vqa}[command](workdir)
