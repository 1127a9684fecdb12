"""Train a LLaVA model like LLaVA does, with one more flag: ``--voco_tokens k``.

    python -m llava_voco.train --model_name_or_path ... --version v1 --data_path ... --image_folder ...
        --vision_tower ... --mm_projector_type mlp2x_gelu ... --voco_tokens 1 --report_to wandb
    deepspeed llava_voco/train/train.py --deepspeed scripts/zero2.json ...      (several processes)

LLaVA's flags are accepted verbatim; one that would have no effect here is refused with a message saying
why. ``main`` is the recipe, read top to bottom; each step is a module of ``llava_voco.train``:
  1. the flags (``arguments``: model, data and training groups), refused where they would have no effect or
     contradict each other (``checks``), then against the directories they name (``plan``: configs,
     tokenizers and the projector file, and ``teacher``'s for ``--voco_teacher``): all before any weight is
     read, each as one line (``cli``);
  2. the model and processor (``building``), one of LLaVA's two set-ups: an LLM directory +
     ``--vision_tower``, or a full Llava / VoCo-Llava checkpoint (``--voco_tokens k`` on a plain Llava
     checkpoint adds VoCo as ``llava_voco.add_voco_to_llava`` does), in one dtype (bf16 under ``--bf16``,
     fp16 under ``--fp16`` with DeepSpeed, else fp32), with the attention backend asked for; what the run
     is goes to the log (``setup_log``);
  3. what trains (``trainable``): pretrain (``--tune_mm_mlp_adapter``: the projector only), finetune (LLM +
     projector; the vision tower only with ``--unfreeze_mm_vision_tower``), ``--freeze_backbone``,
     ``--freeze_mm_mlp_adapter``, LoRA (``--lora_enable``, through PEFT); with ``--voco_distill_weight`` /
     ``--voco_distill_hidden`` the distillation terms and their teacher (``teacher``, ``distillation``);
  4. the data (``data``): LLaVA's JSON, templates, truncation and collator (``--packing``: each batch's
     samples in padding-free rows, docs/design.md §2.6), every sample checked before the first step;
  5. the Trainer (``trainer.VoCoLlavaTrainer``: LLaVA's sampler, projector learning rate, projector saving),
     resuming from the last ``checkpoint-*`` in ``--output_dir`` as LLaVA does (or from
     ``--resume_from_checkpoint``; ``saving``);
  6. save (``saving``): a directory that loads with ``from_pretrained`` (after ``import llava_voco``), with its
     processor; the pretrain stage also writes ``mm_projector.safetensors`` for the next stage's
     ``--pretrain_mm_mlp_adapter``; LoRA is merged into the weights on save (``--lora_merge_on_save``).
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
from typing import NoReturn

if __package__ in (None, ""):  # run as a file (``deepspeed llava_voco/train/train.py``), as LLaVA's scripts do
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    __package__ = "llava_voco.train"

from transformers import set_seed

from llava_voco.conversation import get_template

from .arguments import TrainConfigError, one_line, parse_args
from .building import build_model_and_processor
from .checks import refuse_flags_without_effect
from .data import BadSamplesError, DataError, make_supervised_data_module, sample_error_line
from .plan import plan_loading
from .saving import resume_from, save_trained
from .setup_log import log_setup
from .teacher import build_distillation, plan_teacher
from .trainable import needs_blank_image_rows, set_trainable
from .trainer import CompressionStats, VoCoLlavaTrainer


def main(argv: list[str] | None = None) -> VoCoLlavaTrainer:
    # 1. Flags, parsed; refused where they would have no effect, then against the directories they name:
    #    every refusal before any weight is read.
    model_args, data_args, training_args = parse_args(argv)
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if training_args.should_log else logging.WARNING,
    )
    refuse_flags_without_effect(model_args, data_args, training_args)
    plan = plan_loading(model_args, training_args)
    teacher_plan = plan_teacher(model_args, training_args, plan)
    # The process group first: under ZeRO-3 the weights are partitioned as they load.
    training_args.device
    if training_args.deepspeed:
        import deepspeed

        deepspeed.init_distributed()  # adopts torch's group (the CPU path of TrainingArguments leaves it out)
    set_seed(training_args.seed)

    # 2. Model and processor, by the plan; what the run is, in the log.
    model, processor = build_model_and_processor(model_args, training_args, plan)
    log_setup(model, plan, data_args, training_args)
    # The checkpoint carries its prompt format: apply_chat_template, the chat CLI and the eval entry prompt
    # with the --version the model learns here.
    processor.chat_template = get_template(model_args.version).chat_template()
    processor.conversation_version = model_args.version

    # 3. What trains and, when distilling, what teaches.
    model = set_trainable(model, model_args, training_args)
    distillation = build_distillation(model_args, training_args, model, processor, teacher_plan)

    # 4. Data: every sample checked before the first step (--check_samples).
    try:
        data_module = make_supervised_data_module(
            processor, data_args, version=model_args.version, model_max_length=training_args.model_max_length,
            vision_hidden_size=model.config.vision_config.hidden_size,  # features files of another width: named
        )
    except DataError:
        raise
    except (ValueError, OSError, ImportError) as error:  # the data file, its folders, PyAV: one line, as a flag is
        raise TrainConfigError(str(error)) from error

    # 5. The Trainer, resuming where a previous run stopped.
    base = model.get_base_model() if training_args.lora_enable else model
    trainer = VoCoLlavaTrainer(
        model=model,
        args=training_args,
        processing_class=processor,
        group_by_modality_length=training_args.group_by_modality_length,
        mm_projector_lr=training_args.mm_projector_lr,
        mm_vision_tower_lr=training_args.mm_vision_tower_lr,
        save_projector_only=model_args.tune_mm_mlp_adapter,
        compression_stats=CompressionStats(skipped_up_front=skipped_before_training(data_module["train_dataset"])),
        blank_image_for_text_batches=needs_blank_image_rows(base, training_args),
        distillation=distillation,
        voco_mask=model_args.voco_mask_in_training,
        **data_module,
    )
    trainer.train(resume_from_checkpoint=resume_from(training_args))
    trainer.save_state()

    # 6. Save.
    save_trained(trainer, processor, training_args)
    return trainer


def skipped_before_training(dataset) -> int:
    """Samples the dataset dropped when it checked every sample before training (``--check_samples``)."""
    samples = getattr(dataset, "samples", None)
    return len(samples) - len(dataset) if samples is not None else 0


def cli(argv: list[str] | None = None) -> int:
    try:
        main(argv)
    except TrainConfigError as error:
        print(f"llava-voco-train: error: {one_line(str(error))}", file=sys.stderr)
        return 2
    except DataError as error:  # before training (the check of every sample) or at a sample drawn mid-run
        mid_run = not isinstance(error, BadSamplesError)  # the progress bar's line is left open: start a new one
        print(f"{chr(10) if mid_run else ''}llava-voco-train: error: {one_line(sample_error_line(error))}",
              file=sys.stderr)
        return 1
    if end_process_group():
        exit_before_native_teardown(0)
    return 0


def end_process_group() -> bool:
    """Several processes: wait for every rank, then tear the process group down before the interpreter exits
    (True when there was one)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        return True
    return False


def exit_before_native_teardown(code: int) -> NoReturn:
    """Ends a rank of a finished multi-process run once Python's exit handlers have run (logging, wandb's
    final sync), without the C++ static teardown that follows them. A rank of a CPU run under DeepSpeed
    aborted after saving in 2 of 80 distributed test runs ("terminate called without an active exception": a
    native thread still joinable when destroyed, which points to that teardown), and torchrun then reported
    the finished run as failed. ``atexit._run_exitfuncs`` is CPython's own; tests/test_train_distributed.py
    breaks if it goes."""
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(cli())