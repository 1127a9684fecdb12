"""Distillation against the uncompressed model (docs/design.md §2.7): zero when student and teacher see the
same tokens, positive when the VoCo mask hides the vision tokens from the student, and its gradient reaches
the VoCo path."""

import torch

from llava_voco.constants import IGNORE_INDEX
from llava_voco.train.distillation import VoCoDistillation, answer_kl

from conftest import load_voco, prompt


def batch(processor, digit_images):
    texts = [prompt(processor, "Which digit is at the top left?", 1, answer="seven"),
             prompt(processor, "What is the sum?", 1, answer="twelve")]
    processor.tokenizer.padding_side = "right"
    out = processor(images=digit_images[:2], text=texts, return_tensors="pt", padding=True)
    labels = out["input_ids"].masked_fill(out["attention_mask"] == 0, IGNORE_INDEX)
    labels[:, : labels.shape[1] - 8] = IGNORE_INDEX  # learn the answers' end only, as the data pipeline would
    out["labels"] = labels
    return out


def test_zero_without_the_mask_positive_with_it_and_reaches_the_voco_row(voco_dir, digit_images):
    model, processor = load_voco(voco_dir)
    model.train()
    inputs = batch(processor, digit_images)
    distill = VoCoDistillation(weight=1.0, temperature=2.0, hidden_weight=1.0)
    # student and teacher see the same tokens
    same = distill.terms(model, inputs, model(**inputs, output_hidden_states=True, voco_mask=False))
    assert float(same["kl"]) < 1e-6 and float(same["hidden"]) < 1e-10
    student = model(**inputs, output_hidden_states=True)
    terms = distill.terms(model, inputs, student)
    assert float(terms["kl"]) > 1e-6 and float(terms["hidden"]) > 1e-8
    distill.loss(terms).backward()
    voco_row = model.get_input_embeddings().weight.grad[model.config.voco_token_id]
    assert voco_row.abs().sum() > 0  # the gradient reaches the VoCo path
    with torch.no_grad():  # the teacher's forward left the mask on: the student's forward is unchanged
        torch.testing.assert_close(model(**inputs).logits, student.logits, atol=1e-6, rtol=0)


def test_a_frozen_teacher_model(voco_dir, digit_images):
    """``--voco_teacher``: the KL is against the frozen teacher's own logits (its weights, every vision token
    visible), not the student's with the mask off; the teacher gets no gradient."""
    model, processor = load_voco(voco_dir)
    inputs = batch(processor, digit_images)
    student = model(**inputs)
    same_weights = VoCoDistillation(weight=1.0).terms(model, inputs, student)

    copy, _ = load_voco(voco_dir)  # a frozen copy of the same weights, mask off: the default teacher's KL
    with_copy = VoCoDistillation(weight=1.0, teacher=copy).terms(model, inputs, student)
    torch.testing.assert_close(with_copy["kl"], same_weights["kl"], atol=1e-6, rtol=0)

    teacher, _ = load_voco(voco_dir)  # another checkpoint: the same weights moved
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in teacher.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    teacher.requires_grad_(False)
    with_teacher = VoCoDistillation(weight=1.0, teacher=teacher).terms(model, inputs, student)
    with torch.no_grad():
        teacher_logits = teacher(**{k: v for k, v in inputs.items() if k != "labels"}, voco_mask=False).logits
    torch.testing.assert_close(with_teacher["kl"], answer_kl(student.logits, teacher_logits, inputs["labels"]),
                               atol=1e-6, rtol=0)
    assert abs(float(with_teacher["kl"] - same_weights["kl"])) > 1e-3  # ignoring the teacher would show here
    with_teacher["kl"].backward()
    assert all(parameter.grad is None for parameter in teacher.parameters())
    assert model.get_input_embeddings().weight.grad is not None
