#!/bin/bash
# Stage 2 (LLaVA-1.5 visual instruction tuning): LLM + projector train, the vision tower stays frozen.
# Same flags as LLaVA's scripts/v1_5/finetune.sh; the projector comes from pretrain.sh (LLaVA's own
# mm_projector.bin works too). Add --voco_tokens 1 to train VoCo from the start.
# GPU flags (--bf16, --tf32) as in LLaVA; on a CPU-only machine replace them with --use_cpu True.
# --bf16 True loads the model in bf16 (DeepSpeed keeps fp32 master weights). Where flash-attn is installed
# (pip install 'llava-voco[gpu]'), LLaVA's train_mem.py equivalent is --attn_implementation flash_attention_2
# (the VoCo rule runs through flash-attn's varlen kernel); --packing True removes the padding between samples.

deepspeed llava_voco/train/train.py \
    --deepspeed ./scripts/zero3.json \
    --model_name_or_path lmsys/vicuna-7b-v1.5 \
    --version v1 \
    --data_path ./playground/data/llava_v1_5_mix665k.json \
    --image_folder ./playground/data \
    --vision_tower openai/clip-vit-large-patch14-336 \
    --pretrain_mm_mlp_adapter ./checkpoints/llava-v1.5-7b-pretrain/mm_projector.safetensors \
    --mm_projector_type mlp2x_gelu \
    --mm_vision_select_layer -2 \
    --mm_use_im_start_end False \
    --mm_use_im_patch_token False \
    --image_aspect_ratio pad \
    --group_by_modality_length True \
    --bf16 True \
    --output_dir ./checkpoints/llava-v1.5-7b \
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
