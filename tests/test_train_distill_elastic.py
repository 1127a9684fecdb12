"""Distillation and elastic k through the training entry (docs/design.md §2.7).

Distillation: each logged step carries ``lm_loss``, ``distill_kl`` and ``distill_hidden`` beside the loss, and
the loss is their weighted sum; the language-model term is the plain run's; gradient accumulation and packing
give the losses of the plain layout; ``--voco_teacher`` (a frozen checkpoint) teaches what the default
teacher teaches while the weights are still the starting ones; LoRA trains with it.
Elastic k: every count of ``--voco_train_tokens`` is drawn, the saved model keeps its set and compresses with
each k (prefix + k cached positions), and a k outside the set, or a set that cannot be, is refused by name.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file

from llava_voco import VoCoLlavaForConditionalGeneration, VoCoLlavaProcessor
from llava_voco.image_io import load_image
from llava_voco.train.arguments import TrainConfigError
from llava_voco.train.train import main

from conftest import prompt
from test_train import common_args, layout_a, tiny  # noqa: F401

DISTILL = ["--voco_distill_weight", "1.0", "--voco_distill_temperature", "2.0", "--voco_distill_hidden", "0.5"]


def logged(trainer) -> dict[int, dict]:
    return {entry["step"]: entry for entry in trainer.state.log_history if "loss" in entry}


def run(tiny, output_dir, *extra, **overrides):
    values = {"max_steps": 3, "save_strategy": "no", **overrides}
    return main([str(a) for a in extra] + common_args(tiny, output_dir, **values))


def test_each_term_is_logged_and_the_loss_is_their_weighted_sum(tiny, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="llava_voco.train")
    plain = run(tiny, tmp_path / "plain", "--model_name_or_path", tiny.llava, "--voco_tokens", "1")
    distilled = run(tiny, tmp_path / "kd", "--model_name_or_path", tiny.llava, "--voco_tokens", "1", *DISTILL)
    assert "distillation: 1 * KL(teacher || student) at temperature 2 + 0.5 * hidden-state MSE" in caplog.text
    assert "teacher: the same weights with the VoCo mask off" in caplog.text
    steps = logged(distilled)
    assert sorted(steps) == [1, 2, 3]
    for step, entry in steps.items():
        assert entry["distill_kl"] > 1e-6 and entry["distill_hidden"] > 1e-8, step  # the mask hides what full tokens show
        total = entry["lm_loss"] + 1.0 * entry["distill_kl"] + 0.5 * entry["distill_hidden"]
        assert entry["loss"] == pytest.approx(total, rel=1e-4), step
    # step 1 runs the same weights on the same batch: the language-model term is the plain run's loss
    assert steps[1]["lm_loss"] == pytest.approx(logged(plain)[1]["loss"], abs=1e-5)
    assert logged(plain)[2]["loss"] != pytest.approx(steps[2]["lm_loss"], abs=1e-7)  # the terms moved the weights
    assert "distill_kl" not in logged(plain)[1]


def test_gradient_accumulation_weighs_the_kl_per_answer_token(tiny, tmp_path):
    """Batches of 4 vs 2 x 2 accumulated: the same loss and gradient at each step (the KL is weighted by each
    micro-batch's share of the answer tokens, as the language-model loss is; the hidden-state term, a mean over
    text positions, only approximately, so it is left out here)."""
    kl_only = DISTILL[:4]
    whole = run(tiny, tmp_path / "whole", "--model_name_or_path", tiny.llava, "--voco_tokens", "1", *kl_only)
    accumulated = run(tiny, tmp_path / "accum", "--model_name_or_path", tiny.llava, "--voco_tokens", "1", *kl_only,
                      per_device_train_batch_size=2, gradient_accumulation_steps=2)
    for step, entry in logged(whole).items():
        other = logged(accumulated)[step]
        assert other["loss"] == pytest.approx(entry["loss"], abs=1e-5), step
        assert other["grad_norm"] == pytest.approx(entry["grad_norm"], rel=1e-4), step
        for term in ("lm_loss", "distill_kl"):  # logged per answer token over the micro-batches
            assert other[term] == pytest.approx(entry[term], abs=1e-5), (step, term)


def test_packed_rows_give_the_padded_runs_losses(tiny, tmp_path):
    args = [*layout_a(tiny), "--voco_tokens", "1", *DISTILL, "--model_max_length", "200"]
    padded = run(tiny, tmp_path / "padded", *args)
    packed = run(tiny, tmp_path / "packed", *args, "--packing", "True")
    for step, entry in logged(padded).items():
        for key in ("loss", "lm_loss", "distill_kl", "distill_hidden"):
            assert logged(packed)[step][key] == pytest.approx(entry[key], abs=1e-5), (step, key)


def test_a_frozen_teacher_checkpoint(tiny, tmp_path, caplog):
    """--voco_teacher the starting (plain Llava) checkpoint: at step 1 the student's weights are the teacher's, so
    it teaches what the default teacher does; afterwards it stays where it started."""
    caplog.set_level(logging.INFO, logger="llava_voco.train")
    args = ["--model_name_or_path", tiny.llava, "--voco_tokens", "1", "--voco_distill_weight", "1.0"]
    same_weights = run(tiny, tmp_path / "same", *args)
    frozen = run(tiny, tmp_path / "frozen", *args, "--voco_teacher", tiny.llava)
    assert f"teacher: {tiny.llava}" in caplog.text
    assert logged(frozen)[1]["distill_kl"] == pytest.approx(logged(same_weights)[1]["distill_kl"], abs=1e-6)
    assert logged(frozen)[3]["distill_kl"] != pytest.approx(logged(same_weights)[3]["distill_kl"], abs=1e-6)
    assert all(not p.requires_grad for p in frozen.distillation.teacher.parameters())


def test_with_lora(tiny, tmp_path):
    trainer = run(tiny, tmp_path / "lora", "--model_name_or_path", tiny.llava, "--voco_tokens", "1", *DISTILL,
                  "--lora_enable", "True", "--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0")
    assert all(entry["distill_kl"] > 0 for entry in logged(trainer).values())
    base = trainer.model.get_base_model().eval()  # the teacher's forwards left the mask on
    batch = next(iter(trainer.get_train_dataloader()))
    batch = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "pixel_values")}
    with torch.no_grad():
        assert (base(**batch).logits - base(**batch, voco_mask=False).logits).abs().max() > 1e-4


@pytest.mark.parametrize("flags, message", [
    (["--voco_tokens", "1", "--voco_distill_temperature", "2"], "--voco_distill_temperature: only means something"),
    (["--voco_tokens", "0", "--voco_distill_weight", "1"], "it needs --voco_tokens k > 0"),
    (["--voco_tokens", "1", "--voco_distill_weight", "1", "--voco_mask_in_training", "False"],
     "every distillation term would be 0"),
    (["--voco_tokens", "1", "--voco_distill_weight", "-1"], "--voco_distill_weight -1.0: must be >= 0"),
    (["--voco_tokens", "1", "--voco_distill_weight", "1", "--voco_teacher", "/nonexistent"],
     "--voco_teacher /nonexistent: not a checkpoint directory"),
    (["--voco_tokens", "4", "--voco_train_tokens", "1,2"], "its largest count must be --voco_tokens (4)"),
    (["--voco_tokens", "4", "--voco_train_tokens", "0,4"], "VoCo counts >= 1"),
    (["--voco_tokens", "4", "--voco_train_tokens", "one"], "comma-separated VoCo counts"),
])
def test_refusals(tiny, tmp_path, flags, message):
    with pytest.raises(TrainConfigError) as refused:
        run(tiny, tmp_path / "out", "--model_name_or_path", tiny.llava, *flags)
    assert message in str(refused.value)


def test_a_teacher_of_another_vocabulary_is_refused(tiny, tmp_path):
    other = tmp_path / "other"
    processor = VoCoLlavaProcessor.from_pretrained(tiny.llava)
    processor.tokenizer.add_tokens(["<extra>"])
    model = VoCoLlavaForConditionalGeneration.from_pretrained(tiny.llava)
    model.save_pretrained(other)
    processor.save_pretrained(other)
    with pytest.raises(TrainConfigError, match="its tokenizer differs from the student's"):
        run(tiny, tmp_path / "out", "--model_name_or_path", tiny.llava, "--voco_tokens", "1",
            "--voco_distill_weight", "1", "--voco_teacher", other)


# ---- elastic k ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def elastic_run(tiny, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("elastic") / "out"
    trainer = run(tiny, output_dir, "--model_name_or_path", tiny.llava, "--voco_tokens", "4",
                  "--voco_train_tokens", "1,2,4", max_steps=8)
    return trainer, output_dir


def test_elastic_training_draws_every_count(elastic_run):
    trainer, _ = elastic_run
    stats = trainer.train_dataset.stats
    drawn = {k: stats[f"items_with_voco_tokens_{k}"] for k in (1, 2, 4)}
    assert all(count > 0 for count in drawn.values()), drawn
    assert sum(drawn.values()) < stats["items"]  # the text-only samples have no VoCo run
    assert stats["voco_tokens"] == sum(k * count for k, count in drawn.items())  # one VoCo run per image sample
    per_sample = {round(entry["voco_tokens_per_sample"], 3) for entry in logged(trainer).values()}
    assert len(per_sample) > 1  # batches carried different k


def test_a_saved_elastic_model_compresses_with_each_count(tiny, elastic_run):
    _, output_dir = elastic_run
    assert json.loads((output_dir / "config.json").read_text())["voco_train_tokens"] == [1, 2, 4]
    model = VoCoLlavaForConditionalGeneration.from_pretrained(output_dir).eval()
    processor = VoCoLlavaProcessor.from_pretrained(output_dir)
    assert processor.voco_token_choices == [1, 2, 4]
    image = load_image(tiny.image_folder / "digits" / "0.png")
    text = prompt(processor, "What is in the image?")
    for k in (1, 2, 4):
        inputs = processor(images=image, text=text, return_tensors="pt", voco_tokens=k)
        ids = inputs["input_ids"][0]
        end = int((ids == model.config.voco_token_id).nonzero()[-1]) + 1
        cache = model.compress(input_ids=inputs["input_ids"][:, :end], pixel_values=inputs["pixel_values"], voco_tokens=k)
        prefix = end - int((ids == model.config.image_token_id).sum()) - k
        assert cache.voco_tokens == k and cache.get_seq_length() == prefix + k
    with pytest.raises(ValueError, match=r"trained with VoCo counts \[1, 2, 4\]"):
        processor(images=image, text=text, voco_tokens=3)
    # the <voco> row trained: it left the vocabulary mean of the starting checkpoint, where it began
    start = next(v for n, v in load_file(tiny.llava / "model.safetensors").items() if n.endswith("embed_tokens.weight"))
    row = model.get_input_embeddings().weight[model.config.voco_token_id].detach()
    assert (row - start.mean(0)).abs().max() > 1e-4


def test_retraining_an_elastic_checkpoint_keeps_its_set(tiny, elastic_run, tmp_path):
    _, output_dir = elastic_run
    trainer = run(tiny, tmp_path / "again", "--model_name_or_path", output_dir, max_steps=2)
    assert trainer.model.config.voco_train_tokens == [1, 2, 4]
    with pytest.raises(TrainConfigError, match=r"its largest count must be the model's VoCo tokens \(4, from"):
        run(tiny, tmp_path / "bad", "--model_name_or_path", output_dir, "--voco_train_tokens", "1,2")


def test_a_batch_of_skipped_samples_still_runs_both_forwards(tiny, tmp_path):
    """Batches of one sample, one of them unreadable (--skip_bad_samples): its step runs the student's and the
    teacher's forwards (under ZeRO-3 every rank must) and learns nothing: loss 0, not NaN."""
    samples = json.loads(tiny.data_path.read_text())[:1]
    samples.append({"id": "missing", "image": "digits/nope.png",
                    "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "one"}]})
    data = tmp_path / "data.json"
    data.write_text(json.dumps(samples))
    from torch.nn.modules.module import register_module_forward_hook
    from transformers import LlamaModel

    language_model_forwards = []
    hook = register_module_forward_hook(
        lambda module, args, output: language_model_forwards.append(1) if isinstance(module, LlamaModel) else None)
    try:
        trainer = run(tiny, tmp_path / "out", "--model_name_or_path", tiny.llava, "--voco_tokens", "1", *DISTILL,
                      "--skip_bad_samples", "True", "--check_samples", "False",  # skipped when drawn
                      data_path=data, per_device_train_batch_size=1, max_steps=2)
    finally:
        hook.remove()
    losses = [entry["loss"] for entry in logged(trainer).values()]
    assert sorted(losses)[0] == 0.0 and sorted(losses)[1] > 0, losses
    assert len(language_model_forwards) == 4  # student and teacher at each of the 2 steps
