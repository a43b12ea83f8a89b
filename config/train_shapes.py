# The tiny default, restated (train.py's and model.VLMConfig's defaults; tests/test_configurator.py keeps them equal):
# a VLM from scratch on the built-in shapes data, 9-20 minutes on a 2-core CPU (BENCHMARKS.md).
# python train.py config/train_shapes.py
out_dir = "out-shapes"
# the tower taught alone first on the captions' word pairs (pretrain_tower.py), then kept frozen; then LLaVA's two
# stages in one run: plain captions (every word depends on the image, so the model learns to look), single-turn
# color questions about images of 2-3 shapes (the lookup of an object's color by its shape), then every question of
# the conversations, one per record; curriculum takes the files in this order, each a stage with its own warmup and
# cosine
tower_data_path = "data/shapes/captions.json"
tower_iters = 500
data_path = "data/shapes/captions.json,data/shapes/colors.json,data/shapes/questions.json"
# the image before the question (LLaVA's place: the question reads it) and after it (it reads the question)
version = "plain,vicuna_v1_image_both,vicuna_v1_image_both"
data_multiple = "0.25,0.75,1"  # 312 caption steps, 613 color steps (default data), the rest questions
curriculum = True
image_folder = "data/shapes"
tokenizer_name_or_path = "data/shapes/tokenizer"
model_name_or_path = dict(model_type="llama", hidden_size=128, intermediate_size=512, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                          tie_word_embeddings=True, initializer_range=0.09)  # wider than 0.02: BENCHMARKS.md
vision_tower = dict(model_type="convnext", image_size=48, patch_size=2, num_stages=3, hidden_sizes=[32, 64, 128],
                    depths=[1, 1, 1], layer_scale_init_value=1.0)
mm_vision_select_layer = -1
mm_projector_type = "mlp2x_gelu"
unfreeze_mm_vision_tower = False  # trained on under the LLM's gradients, it loses the binding it was taught
batch_size = 32
max_iters = 1800
eval_interval = 300
learning_rate = 2e-3
min_lr = 1e-4
dtype = "float32"  # bf16 is many times slower on a CPU without native bf16
