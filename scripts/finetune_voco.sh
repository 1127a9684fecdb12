#!/bin/bash
# VoCo fine-tuning (VoCo-LLaMA): start from a LLaVA-1.5 checkpoint in transformers format (for example
# llava-hf/llava-1.5-7b-hf, or the output of finetune.sh) and add --voco_tokens: <voco> is added to the
# tokenizer, each image is followed by that many VoCo tokens, and text reads the image only through
# them (the VoCo attention mask). Everything else is LLaVA's finetune command.
# GPU flags (--bf16, --tf32) as in LLaVA; on a CPU-only machine replace them with --use_cpu True.
# --bf16 True loads the model in bf16 (DeepSpeed keeps fp32 master weights). Where flash-attn is installed
# (pip install 'llava-voco[gpu]'), LLaVA's train_mem.py equivalent is --attn_implementation flash_attention_2
# (the VoCo rule runs through flash-attn's varlen kernel); --packing True removes the padding between samples.

deepspeed llava_voco/train/train.py \
    --deepspeed ./scripts/zero3.json \
    --model_name_or_path ./checkpoints/llava-v1.5-7b-hf \
    --voco_tokens 1 \
    --voco_mask_mode paper \
    --version v1 \
    --data_path ./playground/data/llava_v1_5_mix665k.json \
    --image_folder ./playground/data \
    --mm_vision_select_layer -2 \
    --mm_use_im_start_end False \
    --mm_use_im_patch_token False \
    --image_aspect_ratio pad \
    --group_by_modality_length True \
    --skip_bad_samples True \
    --bf16 True \
    --output_dir ./checkpoints/llava-v1.5-7b-voco1 \
    --num_train_epochs 1 \
    --per_device_train_batch_size 16 \
    --per_device_eval_batch_size 4 \
    --gradient_accumulation_steps 1 \
    --evaluation_strategy "no" \
    --save_strategy "steps" \
    --save_steps 50000 \
    --save_total_limit 1 \
    --learning_rate 2e-5 \
    --weight_decay 0. \
    --warmup_ratio 0.03 \
    --lr_scheduler_type "cosine" \
    --logging_steps 1 \
    --tf32 True \
    --model_max_length 2048 \
    --gradient_checkpointing True \
    --dataloader_num_workers 4 \
    --lazy_preprocess True \
    --report_to wandb
