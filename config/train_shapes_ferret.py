# Ferret on the CPU: the shapes default's model with a region sampler, taught to name the object in a region
# (referring: "What is in [x1, y1, x2, y2] <region_fea>?" -> "a blue square", or the region as a point) and
# to give an object's box (grounding: "Where is the blue square?" -> "[x1, y1, x2, y2]"). Captions first,
# as the default (half of them: the referring questions teach the tower too), then Ferret's GRIT records.
# python train.py config/train_shapes_ferret.py    (BENCHMARKS.md: what it reaches, and in how long)
out_dir = "out-shapes-ferret"
data_path = "data/shapes/captions.json,data/shapes/ferret_train.json"
version = "plain,vicuna_v1"
curriculum = True
data_multiple = "0.5,1"
tower_data_path = ""  # no tower taught first: it learns in the run (the shapes default teaches its own)
unfreeze_mm_vision_tower = True  # a random tower must learn
# the default's LLM at transformers' init (0.02), with which the figures in BENCHMARKS.md were measured
model_name_or_path = dict(model_type="llama", hidden_size=128, intermediate_size=512, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                          tie_word_embeddings=True)
eval_interval = 700
val_data_path = "data/shapes/ferret_val.json"
eval_data_path = "data/shapes/ferret_val_questions.json"
add_region_feature = True
# the mean of the region's features, not Ferret's geo sampler (config/ferret.py): in this CPU budget it got
# the shapes of boxed regions right on every seed tried, the geo sampler on some (BENCHMARKS.md)
region_geo_sampler = False
sampler_num_init_point = 64  # Ferret's 512, scaled to a 6 x 6 feature map
point_input_sample = "center"
image_aspect_ratio = "square_nocrop"  # Ferret's
max_iters = 1875  # one epoch: 625 steps of captions, then 1250 of GRIT
wandb_run_name = "shapes-ferret"
