# LLaVA-1.5 stage 1 (feature alignment), as published in LLaVA's scripts/v1_5/pretrain.sh:
# only the projector trains, on 558K image-caption pairs with the plain template.
# torchrun --standalone --nproc_per_node=8 train.py config/pretrain.py
out_dir = "out-llava-v1.5-7b-pretrain"
model_name_or_path = "lmsys/vicuna-7b-v1.5"
tokenizer_name_or_path = None  # the LLM's own
vision_tower = "openai/clip-vit-large-patch14-336"
mm_vision_select_layer = -2
mm_projector_type = "mlp2x_gelu"
tune_mm_mlp_adapter = True  # projector only: the LLM and the vision tower stay frozen
parallel = "fsdp"  # the frozen 7B sharded over the GPUs (LLaVA: ZeRO-2); the projector alone is saved apart too
fsdp_reshard_after_forward = False  # ZeRO-2: the gathered weights stay for backward
unfreeze_mm_vision_tower = False
version = "plain"
data_path = "playground/data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json"
data_multiple = "1"
tower_data_path = ""  # a pretrained tower: none taught first (the shapes default teaches its own)
image_folder = "playground/data/LLaVA-Pretrain/images"
val_data_path = ""
eval_data_path = ""
image_aspect_ratio = "crop"  # LLaVA's default 'square' is CLIP's processor: resize the short side, center crop
model_max_length = 2048
batch_size = 32  # x 8 GPUs = global batch 256
gradient_accumulation_steps = 1
max_iters = 0  # one epoch
num_train_epochs = 1
learning_rate = 1e-3
min_lr = 0.0
warmup_ratio = 0.03
weight_decay = 0.0
beta2 = 0.999
eval_interval = 1000
log_interval = 1
num_workers = 4
