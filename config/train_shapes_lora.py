# LoRA on the CPU: more conversations for the shapes default's model, its LLM trained through adapters
# (all-linear, r=16) and its projector fully, the tower frozen: LLaVA's LoRA stage at toy scale. LoRA on a
# random LLM would mean nothing, so this starts from the default's checkpoint: run `python train.py` first.
# python train.py config/train_shapes_lora.py    (BENCHMARKS.md: against a full finetune of the same steps)
out_dir = "out-shapes-lora"
init_from = "out-shapes"  # the newest checkpoint of the default run (its base: checkpoints name it)
data_path = "data/shapes/questions.json"  # more of the default's last stage, in its template
version = "vicuna_v1_image_both"
data_multiple = "1"
tower_data_path = ""  # the tower comes with the checkpoint (and LoRA refuses one taught first)
curriculum = False
unfreeze_mm_vision_tower = False
lora_enable = True
lora_r = 16
lora_alpha = 32
lora_dropout = 0.0  # on a CPU its random masks cost more than the adapters (BENCHMARKS.md)
max_iters = 600
learning_rate = 2e-3  # the adapters'; as in LLaVA's recipe, the projector's is 10x lower
mm_projector_lr = 2e-4
min_lr = 1e-4
warmup_iters = 20
eval_interval = 600
