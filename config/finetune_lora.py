# LLaVA-1.5 stage 2 with LoRA, as published in LLaVA's scripts/v1_5/finetune_lora.sh: adapters (r=128,
# alpha=256) on every Linear of the LLM at lr 2e-4, the projector fully at 2e-5, the tower frozen; otherwise
# config/finetune.py. Checkpoints hold the adapters and the projector (0.34B numbers, 1.4 GB in fp32, against
# 27 GB for the whole 7B) and name the stage-1 checkpoint as their base; export.py merges them into it.
# lora_base_dtype='bfloat16' keeps the frozen 6.5B of Linears in half the memory.
# torchrun --standalone --nproc_per_node=8 train.py config/finetune_lora.py
out_dir = "out-llava-v1.5-7b-lora"
init_from = "out-llava-v1.5-7b-pretrain"  # the newest checkpoint of stage 1: the base the adapters sit on
tune_mm_mlp_adapter = False
freeze_backbone = False
unfreeze_mm_vision_tower = False
lora_enable = True
lora_r = 128
lora_alpha = 256
lora_dropout = 0.05
lora_target = "all-linear"
lora_base_dtype = "float32"
version = "vicuna_v1"
data_path = "playground/data/llava_v1_5_mix665k.json"
image_folder = "playground/data"
val_data_path = ""
eval_data_path = ""
image_aspect_ratio = "pad"
group_by_modality_length = True  # batches of image or of text-only records, each of similar lengths
model_max_length = 2048
batch_size = 16  # x 8 GPUs = global batch 128
gradient_accumulation_steps = 1
max_iters = 0  # one epoch
num_train_epochs = 1
learning_rate = 2e-4
mm_projector_lr = 2e-5
min_lr = 0.0
warmup_ratio = 0.03
weight_decay = 0.0
beta2 = 0.999
eval_interval = 1000
log_interval = 1
num_workers = 4
