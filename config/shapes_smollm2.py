# LLaVA's recipe in miniature, with a real pretrained chat LLM: SmolLM2-135M-Instruct gets eyes on the shapes
# data, on a CPU. Stage 0 (captions, LLaVA's stage 1, feature alignment): the LLM frozen, the tower and the
# projector learn to speak its language. Stage 1 (conversations, LLaVA's stage 2): the LLM trains too, through
# LoRA adapters, and keeps what it knew. The LLM's own tokenizer and chat template (ChatML). README and
# BENCHMARKS.md: what it reaches in how long on a 2-core CPU.
# python data/smollm2/prepare.py && python train.py config/shapes_smollm2.py
out_dir = "out-shapes-smollm2"
model_name_or_path = "data/smollm2/model"  # made by data/smollm2/prepare.py from the GGUF in a pip package
tokenizer_name_or_path = None  # the LLM's own
version = "plain,auto"  # captions bare, conversations in the tokenizer's chat template
data_path = "data/shapes/captions.json,data/shapes/train.json"
curriculum = True
data_multiple = "0.04,0.02"  # of the 40,000 captions and 80,000 conversations: 100 steps of each
tower_data_path = ""  # no tower taught first: it learns in the run (the shapes default teaches its own)
max_iters = 0  # one epoch of that
llm_from_stage = 1  # frozen in stage 0
# a small ViT from scratch (CLIP's architecture): 16-pixel patches of the 48-pixel images, 9 image tokens, as
# the LLM's 30 layers are a step's cost per token; a ViT, unlike the default's ConvNeXt, exports to
# transformers' LLaVA (export.py)
vision_tower = dict(model_type="clip_vision_model", image_size=48, patch_size=16, hidden_size=192,
                    intermediate_size=768, num_hidden_layers=3, num_attention_heads=4)
mm_vision_select_layer = -1
unfreeze_mm_vision_tower = True
lora_enable = True
lora_r = 16
lora_alpha = 32
lora_dropout = 0.0
batch_size = 16
learning_rate = 1e-3  # the adapters'
mm_projector_lr = 2e-3
mm_vision_tower_lr = 2e-3
min_lr = 1e-4
warmup_iters = 10
log_interval = 10
# a 135M LLM answers slowly on a CPU (about a minute per 100 questions): the curves see the stage boundary
# and the end, the final table the first 50 questions of each type
eval_interval = 100
eval_iters = 4
eval_subset = 10
eval_final = 50
