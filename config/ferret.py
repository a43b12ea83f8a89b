# Ferret-7B as published (apple/ml-ferret, experiments/ferret_7b_train.sh): Vicuna v1.3 and CLIP-ViT-L/14-336
# (frozen, layer -2), the projector from LLaVA's 336px stage 1 (a Linear), the region sampler (max pooling)
# from scratch; GRIT, Ferret's mix of ten sources with their replication factors; ferret_v1 template, lr 2e-5,
# 3 epochs, global batch 128, bf16, sharded (Ferret: FSDP full_shard) with activation checkpointing.
# torchrun --standalone --nproc_per_node=8 train.py config/ferret.py
out_dir = "out-ferret-7b"
model_name_or_path = "lmsys/vicuna-7b-v1.3"
tokenizer_name_or_path = None  # the LLM's own
vision_tower = "openai/clip-vit-large-patch14-336"
mm_vision_select_layer = -2
mm_projector_type = "linear"
pretrain_mm_mlp_adapter = "checkpoints/llava-336px-pretrain-vicuna-7b-v1.3/mm_projector.bin"
unfreeze_mm_vision_tower = False
version = "ferret_v1"
add_region_feature = True
region_geo_sampler = True
sampler_pooler_mode = "max"
point_input_sample = "segment_mask|center"
image_aspect_ratio = "square_nocrop"
data_path = ",".join(f"playground/GRIT/{name}.json" for name in [
    "git_instruction", "vg_objects", "vg_relations", "vg_regions", "grounded_llava_boxes_detail",
    "grounded_llava_boxes_complex_reasoning", "grounded_llava_boxes_conversation", "refexp_all", "flickr",
    "objects365"])
image_folder = ",".join(f"playground/images/{folder}" for folder in [
    "coco/train2014", "vg", "vg", "vg", "coco/train2014", "coco/train2014", "coco/train2014", "coco/train2014",
    "flickr30k", "objects365"])
data_multiple = "3,1,0.2,0.2,1,1,1,1,1,1"
tower_data_path = ""  # a pretrained tower: none taught first (the shapes default teaches its own)
val_data_path = ""
eval_data_path = ""
model_max_length = 2048
batch_size = 16  # x 8 GPUs = global batch 128
gradient_accumulation_steps = 1
max_iters = 0
num_train_epochs = 3
learning_rate = 2e-5
min_lr = 0.0
warmup_ratio = 0.03
weight_decay = 0.0
beta2 = 0.999
parallel = "fsdp"
activation_checkpointing = True
eval_interval = 1500
log_interval = 1
num_workers = 4
