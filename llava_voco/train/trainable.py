"""Step 3 of the recipe, what trains (the stage): pretrain (``--tune_mm_mlp_adapter``: the projector only),
finetune (LLM + projector; the vision tower only with ``--unfreeze_mm_vision_tower``), ``--freeze_backbone``
(the ``<voco>`` rows still train), ``--freeze_mm_mlp_adapter``, LoRA (``--lora_enable``, through PEFT, the
``<voco>`` rows as trainable tokens); and whether text-only batches get a blank image row."""

from __future__ import annotations

import logging
import re

import torch
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

from llava_voco.model.projectors import projector_for

from .arguments import ModelArguments, TrainingArguments

logger = logging.getLogger("llava_voco.train")


def set_trainable(model, model_args: ModelArguments, training_args: TrainingArguments):
    """Returns the model to train (a PEFT model with --lora_enable)."""
    model.requires_grad_(True)
    if model_args.tune_mm_mlp_adapter:
        model.requires_grad_(False)
        model.model.multi_modal_projector.requires_grad_(True)
    if model_args.freeze_backbone:
        model.model.language_model.requires_grad_(False)
        # ... but the rows of <voco>, the only new parameters VoCo has, train (the rest of the embedding stays)
        voco_rows = voco_token_ids(model)
        if voco_rows and not model_args.tune_mm_mlp_adapter:
            train_rows_only(model.get_input_embeddings().weight, voco_rows)
    if not model_args.unfreeze_mm_vision_tower:
        model.model.vision_tower.requires_grad_(False)
    if training_args.freeze_mm_mlp_adapter:
        model.model.multi_modal_projector.requires_grad_(False)
    projector_for(model.config).freeze_from_flags(model.model.multi_modal_projector, model_args)

    if training_args.lora_enable:
        from peft import LoraConfig, get_peft_model

        modules_to_save = []
        if not training_args.freeze_mm_mlp_adapter:
            modules_to_save.append("multi_modal_projector")
        if model_args.unfreeze_mm_vision_tower:
            modules_to_save.append("vision_tower")
        lora_config = LoraConfig(
            r=training_args.lora_r,
            lora_alpha=training_args.lora_alpha,
            lora_dropout=training_args.lora_dropout,
            bias=training_args.lora_bias,
            # A regex on full names keeps LoRA inside the language model.
            target_modules=r".*language_model.*\.(" + "|".join(map(re.escape, lora_target_modules(model))) + r")",
            modules_to_save=modules_to_save or None,
            # The <voco> rows (embedding, and lm_head when untied) are VoCo's only new parameters: they train as
            # PEFT trainable tokens, are saved with the adapter and merged into the weights.
            trainable_token_indices=voco_trainable_tokens(model),
        )
        model = get_peft_model(model, lora_config)

    if training_args.gradient_checkpointing:
        model.enable_input_require_grads()  # frozen embeddings would otherwise cut the graph, as in LLaVA
    def numel(p):
        return getattr(p, "ds_numel", p.numel())  # ZeRO-3 partitions hold only a slice

    trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(numel(p) for p in model.parameters())
    logger.info("trainable parameters: %d of %d (%.2f%%)", trainable, total, 100.0 * trainable / max(total, 1))
    return model


def lora_target_modules(model) -> list[str]:
    """Every nn.Linear of the language model (not the projector, the vision tower or lm_head), by name."""
    names = set()
    for name, module in model.model.language_model.named_modules():
        if isinstance(module, torch.nn.Linear):
            names.add(name.split(".")[-1])
    return sorted(names)


# Set on an embedding weight of which only some rows train (``train_rows_only``): the optimizer gives it no
# weight decay, so the other rows (zero gradient) stay exactly as they are.
ROWS_ONLY = "llava_voco_rows_only"


def voco_token_ids(model) -> list[int]:
    config = model.config
    return [config.voco_token_id] if config.voco_tokens > 0 and config.voco_token_id is not None else []


def voco_trainable_tokens(model) -> dict[str, list[int]] | None:
    """PEFT's ``trainable_token_indices`` for the <voco> rows: the input embedding's, and lm_head's when it is
    not tied to it (a tied lm_head follows the embedding)."""
    rows = voco_token_ids(model)
    if not rows:
        return None
    tokens = {"embed_tokens": rows}
    if model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
        tokens["lm_head"] = rows
    return tokens


def train_rows_only(weight: torch.nn.Parameter, rows: list[int]) -> None:
    """Train ``rows`` of ``weight`` and nothing else of it: the gradient of every other row is zeroed before it
    is accumulated (so under DeepSpeed too), and the weight gets no weight decay (``ROWS_ONLY``), so Adam
    leaves those rows exactly as they are."""
    num_rows = getattr(weight, "ds_shape", weight.shape)[0]  # ZeRO-3 partitions hold a slice
    keep = torch.zeros(num_rows, 1, dtype=torch.bool)
    keep[rows] = True
    weight.requires_grad_(True)
    weight.register_hook(lambda grad: grad * keep.to(device=grad.device, dtype=grad.dtype))
    setattr(weight, ROWS_ONLY, list(rows))


def needs_blank_image_rows(model, training_args) -> bool:
    """Whether a text-only batch gets a blank-image row (``trainer.with_blank_image_row``): on several processes
    every rank must run the vision path at every step (ZeRO-3 gathers each module's weights as it runs, ZeRO-2
    and DDP reduce every trained parameter's gradient); and wherever the vision path trains, so that its
    parameters get a zero gradient on a text-only batch on one process as on many (Adam moves a parameter
    whose gradient is zero by its momentum but skips one that has none), as in LLaVA, which gives every
    text-only sample a zero image."""
    if is_deepspeed_zero3_enabled() or training_args.world_size > 1:
        return True
    vision_path = list(model.model.vision_tower.parameters()) + list(model.model.multi_modal_projector.parameters())
    return any(p.requires_grad for p in vision_path)
