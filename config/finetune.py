# LLaVA-1.5 stage 2 (visual instruction tuning), as published in LLaVA's scripts/v1_5/finetune.sh:
# the projector and the LLM train on the 665K mix with the vicuna_v1 template, the projector starting from
# stage 1's (config/pretrain.py). A 7B model with fp32 master weights and AdamW takes ~108 GB before
# activations: sharded over 8 GPUs with FSDP (LLaVA: ZeRO-3), blocks recomputed in backward (LLaVA:
# gradient_checkpointing).
# torchrun --standalone --nproc_per_node=8 train.py config/finetune.py
out_dir = "out-llava-v1.5-7b"
model_name_or_path = "lmsys/vicuna-7b-v1.5"
tokenizer_name_or_path = None  # the LLM's own
vision_tower = "openai/clip-vit-large-patch14-336"
mm_vision_select_layer = -2
mm_projector_type = "mlp2x_gelu"
pretrain_mm_mlp_adapter = "out-llava-v1.5-7b-pretrain"  # the newest checkpoint of stage 1: its projector
parallel = "fsdp"
activation_checkpointing = True
tune_mm_mlp_adapter = False
freeze_backbone = False
unfreeze_mm_vision_tower = False
version = "vicuna_v1"
data_path = "playground/data/llava_v1_5_mix665k.json"
data_multiple = "1"
tower_data_path = ""  # a pretrained tower: none taught first (the shapes default teaches its own)
image_folder = "playground/data"
val_data_path = ""
eval_data_path = ""
image_aspect_ratio = "pad"
model_max_length = 2048
packing = True  # records packed into rows of model_max_length, each seeing only itself: no padding, the same loss
batch_size = 16  # x 8 GPUs = global batch 128
gradient_accumulation_steps = 1
max_iters = 0  # one epoch
num_train_epochs = 1
learning_rate = 2e-5
min_lr = 0.0
warmup_ratio = 0.03
weight_decay = 0.0
beta2 = 0.999
eval_interval = 1000
log_interval = 1
num_workers = 4
