"""``transformers.Trainer`` with what LLaVA's trainer changes, and nothing else:

- the sampler: ``--group_by_modality_length`` batches image and text-only samples apart, by length;
- the optimizer: ``--mm_projector_lr`` (and ``--mm_vision_tower_lr``) give those parameters their own
  learning rate in their own parameter groups;
- saving in the pretrain stage (``--tune_mm_mlp_adapter``): checkpoints hold the projector only
  (``mm_projector.safetensors``) plus the Trainer's optimizer / scheduler / RNG state, so they stay small
  and still resume.

Two more things LLaVA does elsewhere (its dataset and model) are done here: on more than one process a
text-only batch gets a blank image row, so every rank runs the vision tower and projector at every step
(``with_blank_image_row``); and a checkpoint resumes with its weights (``_load_from_checkpoint``). A
batch whose every sample was skipped (``llava_voco.train.collator``) still runs its forward, with a loss
of 0.

It also logs, beside the Trainer's metrics, what the compression does to each batch (see
``CompressionStats``) and, with ``--voco_distill_weight`` / ``--voco_distill_hidden``, the loss terms
(``DistillationStats``); they reach every ``--report_to`` integration (wandb: ``train/<name>``).
"""

from __future__ import annotations

import copy
import logging
import os

import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel, Trainer
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from ..constants import IGNORE_INDEX
from ..model.image_inputs import tokens_per_image
from ..model.projectors import projector_for
from ..model.projectors.llamavid import encode_instructions
from .collator import pop_batch_stats
from .distillation import VoCoDistillation
from .samplers import LengthGroupedSampler

logger = logging.getLogger(__name__)

PROJECTOR_FILE = "mm_projector.safetensors"
PROJECTOR_MARKER = "multi_modal_projector."
VISION_TOWER_MARKER = "vision_tower."


def projector_state(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The projector's entries of a model state dict (names as in the model)."""
    return {
        name: tensor.detach().cpu().contiguous()
        for name, tensor in state_dict.items()
        if PROJECTOR_MARKER in name
    }


class CompressionStats:
    """What the compression does to the batches, from the counters the data collator puts in each batch
    (``llava_voco.train.collator.BATCH_STAT_KEYS``; they are popped before the forward).

    Logged with each training loss, summed over ranks:
    ``vision_tokens_per_sample``, ``voco_tokens_per_sample``, ``image_token_share`` (vision tokens /
    non-padding tokens) and ``compression_ratio`` (vision tokens / VoCo tokens, only when VoCo is on),
    over the batches since the previous log; ``samples_skipped``, ``samples_truncated`` and
    ``replies_dropped`` (replies cut by ``model_max_length``, not learned), totals since the start of this
    run (``skipped_up_front``: samples the dataset dropped before training, when it checks every sample first).
    """

    def __init__(self, skipped_up_front: int = 0):
        self.samples = self.vision = self.voco = self.tokens = 0
        self.skipped = self.truncated = self.replies_dropped = 0
        self.skipped_up_front = skipped_up_front

    def update(self, batch_stats: dict[str, int], attention_mask: torch.Tensor | None, batch_size: int, seq_len: int):
        samples = int(batch_stats.get("num_samples", batch_size))
        self.samples += samples
        self.vision += int(batch_stats.get("num_vision_tokens", 0))
        self.voco += int(batch_stats.get("num_voco_tokens", 0))
        if samples:  # a batch of skipped samples holds one stand-in token, not data
            self.tokens += int(attention_mask.sum()) if attention_mask is not None else batch_size * seq_len
        self.skipped += int(batch_stats.get("num_samples_skipped", 0))
        self.truncated += int(batch_stats.get("num_samples_truncated", 0))
        self.replies_dropped += int(batch_stats.get("num_replies_dropped", 0))

    def totals(self, device) -> torch.Tensor:
        values = [self.samples, self.vision, self.voco, self.tokens, self.skipped, self.truncated, self.replies_dropped]
        return torch.tensor(values, dtype=torch.float64, device=device)

    def reset_window(self):
        self.samples = self.vision = self.voco = self.tokens = 0

    def metrics(self, totals: torch.Tensor) -> dict[str, float]:
        """``totals`` summed over ranks."""
        samples, vision, voco, tokens, skipped, truncated, replies_dropped = totals.tolist()
        metrics = {"samples_skipped": skipped + self.skipped_up_front, "samples_truncated": truncated,
                   "replies_dropped": replies_dropped}
        if samples:
            metrics["vision_tokens_per_sample"] = vision / samples
            metrics["voco_tokens_per_sample"] = voco / samples
            metrics["image_token_share"] = vision / tokens if tokens else 0.0
            if voco > 0:
                metrics["compression_ratio"] = vision / voco
        return metrics


def with_blank_image_row(inputs: dict, model, processor) -> dict:
    """A batch without pixels plus one row holding a blank image and no labels.

    On several processes every rank must run the same modules: under ZeRO-3 each module's weights are
    gathered from all ranks as it runs, and ZeRO-2 and DDP reduce every trained parameter's gradient
    across ranks, so a rank whose batch has no image cannot skip the vision tower and projector while
    another rank runs them (ZeRO-3 hangs, ZeRO-2 fails reducing gradients). LLaVA feeds such batches a blank
    image whose features it slices away; here the blank image gets its own row: its labels are all
    ignored and rows do not attend to each other, so the loss and the gradients are those of the
    other rows alone. The row holds the tokens ``tokens_per_image`` gives this model's images (pooled,
    LLaMA-VID's context and content tokens, CLS, VoCo); LLaMA-VID also gets an empty instruction from
    the processor's ``text_decoder_tokenizer``.

    ``model``: the ``VoCoLlavaForConditionalGeneration`` (unwrapped); ``processor``: its processor.
    """
    config = model.config
    vision = config.vision_config
    count = tokens_per_image(config)
    row = [config.image_token_id] * count.image + [config.voco_token_id] * count.voco
    input_ids, attention_mask, labels = inputs["input_ids"], inputs["attention_mask"], inputs["labels"]
    length = max(input_ids.shape[1], len(row))
    pad_id = _pad_id(processor.tokenizer, "the tokenizer")

    def widen(tensor, value, width=length):
        return torch.nn.functional.pad(tensor, (0, width - tensor.shape[1]), value=value)

    blank_ids = widen(input_ids.new_tensor([row]), pad_id)
    blank_mask = widen(attention_mask.new_ones((1, len(row))), 0)
    inputs = dict(inputs)
    inputs["input_ids"] = torch.cat([widen(input_ids, pad_id), blank_ids])
    inputs["attention_mask"] = torch.cat([widen(attention_mask, 0), blank_mask])
    inputs["labels"] = torch.cat([widen(labels, IGNORE_INDEX), torch.full_like(blank_ids, IGNORE_INDEX)])
    if inputs.get("position_ids") is not None:  # packed rows: the blank image is a sample of its own
        positions = inputs["position_ids"]
        extra = length - positions.shape[1]  # added padding restarts at 0, as packed padding does
        padding = torch.arange(extra, device=positions.device).expand(positions.shape[0], extra)
        blank = torch.cat([torch.arange(len(row)), torch.arange(length - len(row))]).to(positions)
        inputs["position_ids"] = torch.cat([torch.cat([positions, padding.to(positions)], dim=1), blank[None]])
    size = vision.image_size if isinstance(vision.image_size, (tuple, list)) else (vision.image_size,) * 2
    inputs["pixel_values"] = torch.zeros(
        1, vision.num_channels, *size, dtype=model.dtype, device=input_ids.device
    )
    if "frame_features" in inputs:  # a batch of precomputed frames only: the blank image is the last image
        precomputed = inputs.get("frame_features_mask")
        if precomputed is None:
            precomputed = torch.ones(len(inputs["frame_features"]), dtype=torch.bool, device=input_ids.device)
        inputs["frame_features_mask"] = torch.cat([precomputed.bool(), precomputed.new_zeros(1, dtype=torch.bool)])
        if "video_frame_mask" in inputs:
            frames = inputs["video_frame_mask"]
            inputs["video_frame_mask"] = torch.cat([frames, frames.new_zeros(1)])
    if projector_for(config).reads_instruction:
        inputs.update(_with_empty_instruction(inputs, processor, input_ids.device))
    return inputs


def _pad_id(tokenizer, what: str) -> int:
    if tokenizer is None:
        raise ValueError(f"{what} is missing")
    if tokenizer.pad_token_id is None:
        raise ValueError(f"{what} has no pad token; set one (LLaVA uses the unk token)")
    return tokenizer.pad_token_id


def _with_empty_instruction(inputs: dict, processor, device) -> dict:
    """LLaMA-VID's instruction rows plus an empty one for the blank image, all padded to one width with the
    text decoder tokenizer's pad id."""
    text_decoder_tokenizer = getattr(processor, "text_decoder_tokenizer", None)
    pad_id = _pad_id(text_decoder_tokenizer, "LLaMA-VID's text decoder tokenizer (processor.text_decoder_tokenizer)")
    empty = encode_instructions(text_decoder_tokenizer, [""], processor.instruction_max_length)
    rows = {}
    for key, value in (("instruction_input_ids", pad_id), ("instruction_attention_mask", 0)):
        blank = empty[key].to(device)
        if inputs.get(key) is None:
            rows[key] = blank
            continue
        earlier = inputs[key]
        width = max(earlier.shape[1], blank.shape[1])
        padded = [torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value) for t in (earlier, blank.to(earlier.dtype))]
        rows[key] = torch.cat(padded)
    return rows


class DistillationStats:
    """The loss terms since the previous log (``llava_voco.train.distillation``): ``lm_loss`` (the
    language-model loss alone), ``distill_kl``, ``distill_hidden``, each averaged over the forward passes and
    ranks weighted by their answer tokens, as the Trainer weighs the loss itself (so one process and several
    log the same values)."""

    NAMES = ("lm_loss", "distill_kl", "distill_hidden")

    def __init__(self):
        self.sums = dict.fromkeys(self.NAMES, 0.0)
        self.answer_tokens = 0

    def update(self, lm_loss: torch.Tensor, terms: dict[str, torch.Tensor], answer_tokens: int):
        self.sums["lm_loss"] += float(lm_loss) * answer_tokens
        self.sums["distill_kl"] += float(terms["kl"].detach()) * answer_tokens
        self.sums["distill_hidden"] += float(terms["hidden"].detach()) * answer_tokens if "hidden" in terms else 0.0
        self.answer_tokens += answer_tokens

    def totals(self, device) -> torch.Tensor:
        return torch.tensor([*self.sums.values(), self.answer_tokens], dtype=torch.float64, device=device)

    def metrics(self, totals: torch.Tensor, hidden: bool) -> dict[str, float]:
        *sums, answer_tokens = totals.tolist()
        self.sums, self.answer_tokens = dict.fromkeys(self.NAMES, 0.0), 0
        if not answer_tokens:
            return {}
        metrics = {name: value / answer_tokens for name, value in zip(self.NAMES, sums)}
        if not hidden:
            del metrics["distill_hidden"]
        return metrics


# The learning rate of --mm_projector_lr's / --mm_vision_tower_lr's groups, logged beside the main one.
OWN_LR_LOG_NAMES = {PROJECTOR_MARKER: "learning_rate_mm_projector", VISION_TOWER_MARKER: "learning_rate_mm_vision_tower"}


class VoCoLlavaTrainer(Trainer):
    def __init__(
        self,
        *args,
        group_by_modality_length: bool = False,
        mm_projector_lr: float | None = None,
        mm_vision_tower_lr: float | None = None,
        save_projector_only: bool = False,
        compression_stats: CompressionStats | None = None,
        blank_image_for_text_batches: bool = False,
        distillation: VoCoDistillation | None = None,
        voco_mask: bool = True,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        # False trains the VoCo paper's lower bound (--voco_mask_in_training False): every forward gets
        # voco_mask=False, so text reads the vision tokens; the saved model runs with the mask
        self.voco_mask = voco_mask
        self.group_by_modality_length = group_by_modality_length
        self.mm_projector_lr = mm_projector_lr
        self.mm_vision_tower_lr = mm_vision_tower_lr
        self.save_projector_only = save_projector_only
        self.save_full_model_too = False  # set for the final save of the pretrain stage
        self.compression_stats = compression_stats
        self.blank_image_for_text_batches = blank_image_for_text_batches
        self.distillation = distillation
        self.distillation_stats = DistillationStats() if distillation is not None else None
        self._own_lr_groups: dict[str, int] = {}  # log name -> index of the group with that learning rate
        self._own_lrs_now: dict[str, float] = {}

    # ---- sampler ------------------------------------------------------------------------------------
    def _get_train_sampler(self, train_dataset=None):
        if not self.group_by_modality_length:
            return super()._get_train_sampler(train_dataset)
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        # Every rank builds the same order (same seed); the dataloader then shards the batches.
        return LengthGroupedSampler(
            self.args.train_batch_size,
            world_size=self.args.world_size * self.args.gradient_accumulation_steps,
            lengths=dataset.modality_lengths,
            group_by_modality=True,
            generator=torch.Generator().manual_seed(seed),
        )

    # ---- optimizer ----------------------------------------------------------------------------------
    def get_decay_parameter_names(self, model) -> list[str]:
        """The Trainer's, less weights of which only some rows train (``trainable.train_rows_only``): weight
        decay would move their frozen rows."""
        from .trainable import ROWS_ONLY

        rows_only = {name for name, param in model.named_parameters() if getattr(param, ROWS_ONLY, None) is not None}
        return [name for name in super().get_decay_parameter_names(model) if name not in rows_only]

    def create_optimizer(self, model=None):
        own_lrs = [
            (marker, lr)
            for marker, lr in ((PROJECTOR_MARKER, self.mm_projector_lr), (VISION_TOWER_MARKER, self.mm_vision_tower_lr))
            if lr is not None
        ]
        if self.optimizer is not None or not own_lrs:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        groups: dict[tuple, list] = {}
        for name, param in opt_model.named_parameters():
            if not param.requires_grad:
                continue
            lr = next((lr for marker, lr in own_lrs if marker in name), None)
            groups.setdefault((lr, name in decay), []).append(param)
        # The main learning rate's groups first: the Trainer logs the first group's rate as learning_rate.
        param_groups, self._own_lr_groups = [], {}
        for (lr, decays), params in sorted(groups.items(), key=lambda item: item[0][0] is not None):
            group = {"params": params, "weight_decay": self.args.weight_decay if decays else 0.0}
            if lr is not None:
                group["lr"] = lr
                marker = next(marker for marker, own_lr in own_lrs if own_lr == lr)
                self._own_lr_groups.setdefault(OWN_LR_LOG_NAMES[marker], len(param_groups))
            param_groups.append(group)
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        self.optimizer = optimizer_cls(param_groups, **optimizer_kwargs)
        return self.optimizer

    # ---- projector-only saving (pretrain stage) -----------------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict=None):
        if not self.save_projector_only:
            return super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if state_dict is None:
            state_dict = self.accelerator.unwrap_model(self.model).state_dict()
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
            model = self.accelerator.unwrap_model(self.model)
            save_file(
                projector_state(state_dict),
                os.path.join(output_dir, PROJECTOR_FILE),
                metadata={"format": "pt", "mm_projector_type": model.config.mm_projector_type},
            )
        if self.save_full_model_too:
            return super()._save(output_dir, state_dict)
        if self.args.should_save:
            self.accelerator.unwrap_model(self.model).config.save_pretrained(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        projector_file = os.path.join(resume_from_checkpoint, PROJECTOR_FILE)
        if self.save_projector_only and os.path.isfile(projector_file):
            model = model if model is not None else self.model
            # Only the projector trains in this stage: the rest of the model is as loaded at start.
            result = model.load_state_dict(load_file(projector_file), strict=False)
            if result.unexpected_keys:
                raise ValueError(f"{projector_file}: unexpected keys {result.unexpected_keys}")
            return
        unwrapped = self.accelerator.unwrap_model(model if model is not None else self.model)
        weights = [os.path.join(resume_from_checkpoint, name) for name in (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME)]
        if isinstance(unwrapped, PreTrainedModel) and any(os.path.isfile(w) for w in weights):
            # save_pretrained writes Llava's on-disk key layout (transformers' checkpoint conversion mapping);
            # the Trainer's own loader reads it with load_state_dict(strict=False), which would skip every
            # renamed key without a word. from_pretrained converts the keys back; strict=True checks it.
            loaded = type(unwrapped).from_pretrained(
                resume_from_checkpoint, config=copy.deepcopy(unwrapped.config), dtype=unwrapped.dtype
            )
            unwrapped.load_state_dict(loaded.state_dict(), strict=True)
            logger.info("model weights loaded from %s", resume_from_checkpoint)
            return
        return super()._load_from_checkpoint(resume_from_checkpoint, model)

    # ---- compression stats, the ZeRO-3 blank image, batches of skipped samples ---------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        batch_stats = pop_batch_stats(inputs)  # data counters, not model inputs
        if self.compression_stats is not None and model.training:
            input_ids = inputs["input_ids"]
            self.compression_stats.update(batch_stats, inputs.get("attention_mask"), *input_ids.shape[:2])
        if self.blank_image_for_text_batches and "pixel_values" not in inputs:
            inputs = self.with_blank_image_row(inputs)
        if not self.voco_mask:
            inputs = {**inputs, "voco_mask": False}
        labels = inputs.get("labels")
        learnable = labels is None or bool((labels != IGNORE_INDEX).any())
        if self.distillation is not None and model.training and labels is not None:
            # also for a batch with nothing to learn: under ZeRO-3 every rank must run the teacher's forward too
            return self.compute_loss_with_distillation(model, inputs, return_outputs, num_items_in_batch, learnable)
        if learnable:
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        # Nothing to learn (every sample of the batch was skipped): the forward still runs, as on the other
        # ranks, and the loss is 0 with zero gradients instead of the NaN of a mean over no label.
        _, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        loss = outputs.logits.sum() * 0.0
        return (loss, outputs) if return_outputs else loss

    def compute_loss_with_distillation(self, model, inputs, return_outputs, num_items_in_batch, learnable=True):
        """The language-model loss plus the distillation terms, weighted like it: when the Trainer normalises
        the loss by the answer tokens of the whole accumulated batch (``num_items_in_batch``), each term is
        weighted by this batch's share of them, so gradient accumulation and several processes sum the
        terms per answer token as they do the loss."""
        student_inputs = dict(inputs)
        if self.distillation.needs_hidden_states:
            student_inputs["output_hidden_states"] = True
        lm_loss, outputs = super().compute_loss(model, student_inputs, return_outputs=True,
                                                num_items_in_batch=num_items_in_batch)
        unwrapped = self.accelerator.unwrap_model(model)
        terms = self.distillation.terms(model, inputs, outputs, unwrapped=unwrapped)
        if not learnable:  # every sample skipped: both forwards ran, as on the other ranks; nothing is learned
            loss = outputs.logits.sum() * 0.0
            return (loss, outputs) if return_outputs else loss
        share = 1.0
        answer_tokens = (inputs["labels"][:, 1:] != IGNORE_INDEX).sum()
        if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            share = answer_tokens / num_items_in_batch
            if self.args.average_tokens_across_devices:  # as the Trainer scales the loss
                share = share * self.accelerator.num_processes
            lm_loss_alone = lm_loss.detach() / share
        else:
            lm_loss_alone = lm_loss.detach()
        self.distillation_stats.update(lm_loss_alone, terms, int(answer_tokens))
        loss = lm_loss + share * self.distillation.loss(terms)
        return (loss, outputs) if return_outputs else loss

    def with_blank_image_row(self, inputs: dict) -> dict:
        """``with_blank_image_row`` for this Trainer's model (unwrapped, PEFT's base) and processor."""
        model = self.accelerator.unwrap_model(self.model)
        if hasattr(model, "get_base_model"):  # PEFT
            model = model.get_base_model()
        return with_blank_image_row(inputs, model, self.processing_class)

    def _get_learning_rate(self) -> float:
        """The main learning rate (the first group's, ``create_optimizer`` puts it first), keeping the rates of
        ``--mm_projector_lr`` / ``--mm_vision_tower_lr`` groups at the same moment for ``log``."""
        rate = super()._get_learning_rate()
        self._own_lrs_now = {}
        if self._own_lr_groups:
            try:
                rates = self.lr_scheduler.get_last_lr()
            except AssertionError:  # DeepSpeed's scheduler before its first step (the Trainer logs 0 then)
                return rate
            self._own_lrs_now = {name: rates[index] for name, index in self._own_lr_groups.items()}
        return rate

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "learning_rate" in logs:
            logs.update(self._own_lrs_now)
        if self.compression_stats is not None and "loss" in logs:
            totals = self.compression_stats.totals(self.args.device)
            if self.args.world_size > 1:
                totals = self.accelerator.reduce(totals, reduction="sum")
            logs.update(self.compression_stats.metrics(totals))
            self.compression_stats.reset_window()
        if self.distillation_stats is not None and "loss" in logs:
            totals = self.distillation_stats.totals(self.args.device)
            if self.args.world_size > 1:
                totals = self.accelerator.reduce(totals, reduction="sum")
            logs.update(self.distillation_stats.metrics(totals, hidden=self.distillation.needs_hidden_states))
        super().log(logs, start_time)
