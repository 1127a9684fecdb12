"""Distillation of what full vision tokens know into the VoCo path (docs/design.md §2.4, §2.7).

Plain fine-tuning with the VoCo mask only approximates ``KL(p(y | V, T) || p(y | VoCo(V), T))``. This adds it
explicitly: the *teacher* is the same batch seen with every vision token visible, either the same weights
with the VoCo mask off under ``no_grad`` (one extra forward, no extra weights; the default) or a frozen copy
of a starting checkpoint. The terms:

- ``kl``: ``KL(teacher || student)`` of the next-token distributions at the positions that predict answer
  tokens (labels other than IGNORE_INDEX), at ``temperature`` (scaled by its square, as usual);
- ``hidden`` (optional): per layer, the mean squared difference of student and teacher hidden states at
  the text positions (after each sample's last VoCo token), averaged over layers: the paper's attention
  distillation made explicit. It is a mean over a batch's text positions, so under gradient accumulation
  the Trainer weighs each micro-batch's mean by its share of answer tokens (as it does ``kl``), which is
  close to, not exactly, the mean over the accumulated batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from ..constants import IGNORE_INDEX
from ..model.voco_mask import NEVER_HIDDEN, packed_sample_index


def answer_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
              temperature: float = 1.0) -> torch.Tensor:
    """``KL(teacher || student)`` per answer token, averaged: logits ``[batch, seq, vocab]``, labels ``[batch, seq]``
    (position t's logits predict label t + 1)."""
    predicts_answer = labels[:, 1:] != IGNORE_INDEX  # [batch, seq - 1]
    if not bool(predicts_answer.any()):
        return student_logits.sum() * 0.0
    student = student_logits[:, :-1][predicts_answer].float() / temperature  # [answer tokens, vocab]
    teacher = teacher_logits[:, :-1][predicts_answer].float() / temperature
    kl = F.kl_div(F.log_softmax(student, dim=-1), F.log_softmax(teacher, dim=-1), log_target=True,
                  reduction="batchmean")
    return kl * temperature**2


def text_hidden_loss(student_hidden: tuple[torch.Tensor, ...], teacher_hidden: tuple[torch.Tensor, ...],
                     text_positions: torch.Tensor) -> torch.Tensor:
    """Mean over layers of the mean squared hidden-state difference at ``text_positions`` ``[batch, seq]``."""
    if not bool(text_positions.any()):
        return student_hidden[-1].sum() * 0.0
    layers = [F.mse_loss(s[text_positions].float(), t[text_positions].float())
              for s, t in zip(student_hidden[1:], teacher_hidden[1:])]  # [0] is the embeddings: identical
    return torch.stack(layers).mean()


@dataclass
class VoCoDistillation:
    """The extra loss terms; ``teacher``: a frozen model (``--voco_teacher PATH``), or None for the same
    weights with the mask off."""

    weight: float = 0.0
    temperature: float = 1.0
    hidden_weight: float = 0.0
    teacher: torch.nn.Module | None = None

    @property
    def needs_hidden_states(self) -> bool:
        return self.hidden_weight > 0

    def teacher_outputs(self, model, inputs: dict):
        with torch.no_grad():
            # every vision token visible: the frozen teacher, or the same weights, with the VoCo mask off
            teacher = self.teacher if self.teacher is not None else model
            return teacher(**inputs, output_hidden_states=self.needs_hidden_states, voco_mask=False)

    def terms(self, model, inputs: dict, student_outputs, unwrapped=None) -> dict[str, torch.Tensor]:
        """``{"kl": ..., "hidden": ...}`` (unweighted) for a batch and the student's outputs on it. ``model`` runs
        the teacher's forward (a Trainer's wrapped model: DDP, DeepSpeed); ``unwrapped``: the model inside it,
        whose layout gives the text positions (default: ``model``)."""
        unwrapped = unwrapped if unwrapped is not None else model
        model_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "output_hidden_states", "num_items_in_batch")}
        teacher = self.teacher_outputs(model, model_inputs)
        terms = {"kl": answer_kl(student_outputs.logits, teacher.logits, inputs["labels"], self.temperature)}
        if self.needs_hidden_states:
            terms["hidden"] = text_hidden_loss(student_outputs.hidden_states, teacher.hidden_states,
                                               text_positions(unwrapped, inputs))
        return terms

    def loss(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        total = self.weight * terms["kl"]
        if "hidden" in terms:
            total = total + self.hidden_weight * terms["hidden"]
        return total


def text_positions(model, inputs: dict) -> torch.Tensor:
    """``[batch, seq]``: real positions after their sample's last VoCo token (where the rule hides vision)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    sample_index = packed_sample_index(inputs.get("position_ids"))  # packed rows: each sample its own text
    layout = base.model.voco_layout(inputs["input_ids"], inputs.get("attention_mask"), sample_index=sample_index)
    positions = torch.arange(inputs["input_ids"].shape[1], device=inputs["input_ids"].device)
    text = (positions >= layout.text_start) & (layout.text_start < NEVER_HIDDEN)
    if inputs.get("attention_mask") is not None:
        text = text & inputs["attention_mask"].bool()
    return text


__all__ = ["VoCoDistillation", "answer_kl", "text_hidden_loss", "text_positions"]
