"""
Train a vision-language model: image -> vision tower -> projector -> LLM.

    python train.py                                   # tiny default: built-in shapes data, CPU, minutes
    python train.py config/finetune.py --batch_size=8 # a config file, then --key=value overrides
    torchrun --standalone --nproc_per_node=8 train.py config/finetune.py

LLaVA's train.py with the Hugging Face Trainer and DeepSpeed written out. The defaults below, with
model.VLMConfig's, are the tiny shapes run (config/train_shapes.py restates them). What trains is config:
LLaVA's stage 1 trains the projector only (tune_mm_mlp_adapter=True), stage 2 the projector and the LLM; the
tower trains with unfreeze_mm_vision_tower=True. Under torchrun the model is replicated (parallel='ddp') or
sharded (parallel='fsdp': FSDP2, for models that do not fit one device with gradients and optimizer state).
"""
import json
import math
import os
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP
from transformers import AutoTokenizer

import configurator
from checkpoint import (find_checkpoint, load, load_projector, load_train_state, lock, remove_unfinished,
                        save_checkpoint, unlock, write_lora_base)
from conversation import IGNORE_INDEX, IMAGE_TOKEN, REGION_TOKEN, add_tokens, chat_template
from data import (ShardDataset, collate, epoch_batches, global_batches, make_if_missing, per_source, preprocess,
                  rank_batches, read_manifest)
from eval import evaluate, report
from lora import apply_lora, base_checksum, find_targets, has_lora, is_lora
from model import TOKENIZER_FIELDS, VLM, VLMConfig, check_packing
from plot import plot_curves
from pretrain_tower import caption_records, teach_tower
from train_utils import (PREEMPTED, STOP, blocks, check_settings, checkpoint_blocks, exit_distributed, gpu_peak_flops,
                         init_distributed, interval_stats, log_line, lr_multiplier, split_batch, stage_starts,
                         stop_on_signals, take_rank0_weights, train_flops, trim_log, val_losses)

# -----------------------------------------------------------------------------
# I/O
out_dir = "out-shapes"
# 'scratch', 'resume' (out_dir's newest checkpoint), a checkpoint / out_dir, or a transformers LLaVA folder
init_from = "scratch"
eval_interval = 300  # optimizer steps between val losses and checkpoints
log_interval = 50
eval_iters = 10  # val batches per val loss
keep_last = 1  # checkpoints kept in out_dir
eval_data_path = "data/shapes/val_questions.json"  # questions + answers for eval.py at the end ('' skips)
eval_image_folder = "data/shapes"
eval_subset = 50  # questions of each type answered at each eval_interval too, for the curves (0: at the end only)
eval_final = 0  # questions of each type answered at the end (0: all of them)
wandb_log = False
wandb_project = "glimpse"
wandb_run_name = "shapes"
# data (several files: comma-separated, with one image folder each or one for all); data_path may also be a
# folder of shards made by data.py; JSON files are made into shards under out_dir/data/
data_path = "data/shapes/captions.json,data/shapes/colors.json,data/shapes/questions.json"
image_folder = "data/shapes"
val_data_path = "data/shapes/val.json"
val_image_folder = "data/shapes"
# chat template (conversation.py): one for all data files or one per file; the image before and after the question
version = "plain,vicuna_v1_image_both,vicuna_v1_image_both"
curriculum = True  # the data files one after another (each shuffled, each a stage with its own lr schedule)
data_multiple = "0.25,0.75,1"  # per data file (or one for all): times each record is seen per epoch (0.5 = half)
group_by_modality_length = False  # LLaVA's: batches of image or text-only records, each sorted by length
strict = False  # a bad record is an error instead of a counted skip (data.py lists skips in skipped.jsonl)
max_skipped = 0.5  # the share of a data file's records that may be skipped; more stops the run (a wrong folder?)
allow_outside_images = False  # image names may lead out of their image folder ('..', absolute paths)
image_aspect_ratio = "pad"  # 'pad' (LLaVA's expand2square), 'square_nocrop' (Ferret), 'crop'
model_max_length = 2048  # tokens, image tokens included
packing = False  # each micro-batch's records packed into rows of up to model_max_length tokens: same loss, no padding
num_workers = 0  # DataLoader workers that read images
tokenizer_name_or_path = "data/shapes/tokenizer"  # None: the tokenizer of model_name_or_path
# model: every field of model.VLMConfig (model_name_or_path, vision_tower, mm_projector_type, ...) is a config
# key too, with its default written there: the tiny shapes model
pretrain_mm_mlp_adapter = ""  # the projector from stage 1: its checkpoint, a .safetensors, or LLaVA's mm_projector.bin
# what trains
tune_mm_mlp_adapter = False  # True: the projector only (LLaVA stage 1)
freeze_backbone = False  # True: the LLM stays frozen
llm_from_stage = 0  # curriculum: the LLM (or its adapters) trains from this stage (data file) on, frozen before
unfreeze_mm_vision_tower = False  # True: the vision tower trains too (a random tower must, unless taught first)
# a random tower taught alone first, on captions (pretrain_tower.py: CatLIP's loss, with the caption's word pairs
# as the classes), before the LLM's first step; a fresh run only
tower_data_path = "data/shapes/captions.json"  # a JSON file of captions ('' skips)
tower_image_folder = None  # None: image_folder (its first, where it names one per data file)
tower_iters = 500  # its steps of batch_size images, AdamW at mm_vision_tower_lr (None: learning_rate)
# Ferret: regions of the image in (GRIT records' <bbox_location{i}> placeholders, ferret.py), boxes out as text;
# add_region_feature and the region sampler's settings are VLMConfig's
point_input_sample = "segment_mask|center"  # a point region: 'center' or 'gaussian' (in the box),
# 'segment_mask|uniform' or 'segment_mask|center' (in the object's segmentation, where the record has one)
no_coor = False  # a region is its token alone, no coordinates in the text: the features must carry where it is
# LoRA (lora.py; LLaVA's names and defaults): the LLM's Linears train through low-rank adapters, the projector fully
lora_enable = False
lora_r = 64
lora_alpha = 16  # the update is scaled by lora_alpha / lora_r
lora_dropout = 0.05
lora_target = "all-linear"  # every Linear of the LLM but its head, or comma-separated regexes: 'q_proj,v_proj'
lora_rslora = False  # scale by lora_alpha / sqrt(lora_r) instead (rsLoRA)
lora_vision_tower = False  # adapters on the vision tower's Linears too, at mm_vision_tower_lr
lora_base_dtype = "float32"  # 'bfloat16' keeps the frozen weights under the adapters in half the memory
# optimizer: AdamW, linear warmup then cosine decay to min_lr
batch_size = 32  # per process and micro-step
gradient_accumulation_steps = 1  # micro-steps per optimizer step, summed over all processes
max_iters = 1800  # optimizer steps; 0 means num_train_epochs over the data
num_train_epochs = 1
learning_rate = 2e-3
mm_projector_lr = None  # None: learning_rate
mm_vision_tower_lr = None  # None: learning_rate
min_lr = 1e-4  # cosine floor (groups with their own lr keep the same ratio)
warmup_iters = 0  # per stage; 0: warmup_ratio of the stage's steps
warmup_ratio = 0.03
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.98
grad_clip = 1.0  # 0 disables
# parallelism and memory (under torchrun)
parallel = "ddp"  # 'ddp': a replica per process; 'fsdp': FSDP2, parameters, gradients and AdamW state sharded
fsdp_reshard_after_forward = True  # True frees gathered weights after forward (ZeRO-3), False keeps them (ZeRO-2)
max_bad_steps = 0  # steps with a non-finite loss or gradient that are skipped (not applied); one more stops the run
activation_checkpointing = False  # recompute each block of the LLM (and a training tower) in backward: less memory
peak_flops = 0.0  # the device's peak FLOP/s at dtype, for the MFU in the log; 0: known GPUs are looked up
attn_implementation = None  # the LLM's: 'sdpa', 'eager', 'flex_attention', 'flash_attention_2'; None: its default
dist_timeout = 600  # seconds a collective waits for a stuck or dead rank before the job ends (rank 0's own work waits)
# system
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = "bfloat16" if device == "cuda" and torch.cuda.is_bf16_supported() else "float32"  # bf16 is slow on CPUs
compile = False
seed = 1337
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items()
               if not k.startswith("_") and isinstance(v, (int, float, bool, str, dict, list, tuple, type(None)))]
model_defaults = {k: v for k, v in asdict(VLMConfig()).items() if k not in TOKENIZER_FIELDS}
config = configurator.configure({**model_defaults, **{k: globals()[k] for k in config_keys}}, sys.argv[1:])
globals().update(config)
check_settings(config)
# -----------------------------------------------------------------------------

warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # one process checkpoints alone, as meant
ddp = int(os.environ.get("RANK", -1)) != -1  # started by torchrun: DDP, or FSDP with parallel='fsdp'
fsdp = ddp and parallel == "fsdp"
rank, world, device, waits = init_distributed(device, dist_timeout)  # waits: where ranks wait for rank 0's own work
master = rank == 0
torch.manual_seed(seed)  # every rank builds the same random init
device_type = "cuda" if device.startswith("cuda") else "cpu"
ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
# bf16: autocast over fp32 weights, or under FSDP its mixed-precision policy (bf16 copies of the gathered
# weights for compute, gradients reduced in fp32 onto fp32 shards)
autocast = nullcontext() if ptdtype == torch.float32 or fsdp else torch.autocast(device_type, dtype=ptdtype)
# the global batch is batch_size * gradient_accumulation_steps records, however many processes share it
accum, micro_batch = split_batch(batch_size, gradient_accumulation_steps, world)
global_batch = micro_batch * accum * world


def log(*a):  # LLaVA's rank0_print
    if master:
        print(*a, flush=True)


if master:  # one run per out_dir; the built-in datasets make themselves on a first run
    lock(out_dir)
    remove_unfinished(out_dir)
    for f in filter(None, ",".join((data_path, val_data_path, eval_data_path, tower_data_path)).split(",")):
        make_if_missing(f)
if ddp:
    dist.barrier(waits)

# model and tokenizer ----------------------------------------------------------
state = {"iter": 0, "epoch": 0, "epoch_step": 0}
ckpt = find_checkpoint(init_from, out_dir, log)
# ranks other than 0 build the model on the meta device, its shapes without weights: rank 0's come by broadcast
# once it is sharded (FSDP) or wrapped (DDP), so that no host holds a whole model per process
meta = ddp and not master
if ckpt:
    log(f"loading {ckpt}")
    with torch.device("meta") if meta else nullcontext():
        model, _ = load(ckpt)
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
else:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_name_or_path or config["model_name_or_path"])
    add_tokens(tokenizer, config["add_region_feature"])  # <image>, and Ferret's <region_fea>
    region_id = tokenizer.convert_tokens_to_ids(REGION_TOKEN) if config["add_region_feature"] else None  # Ferret
    with torch.device("meta") if meta else nullcontext():
        model = VLM(VLMConfig(**{k: config[k] for k in model_defaults}, vocab_size=len(tokenizer),
                              image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), region_token_id=region_id))
if config["add_region_feature"] != (model.region_sampler is not None):  # Ferret
    raise ValueError(f"add_region_feature={config['add_region_feature']}, but the model of {ckpt} differs: a "
                     "Ferret model starts from model_name_or_path (and pretrain_mm_mlp_adapter), as Ferret's does")
if attn_implementation:
    model.llm.set_attn_implementation(attn_implementation)
if packing and not meta:  # only where the LLM keeps a packed record's attention within it: one forward tells
    check_packing(model.llm)
if tokenizer.pad_token_id is None:
    tokenizer.pad_token = tokenizer.eos_token  # padding is masked out; any id will do
if lora_enable and not has_lora(model):
    model.lora_base = write_lora_base(model, ckpt, out_dir, {"train": config}, master)
    names = apply_lora(model, find_targets(model, lora_target, lora_vision_tower), lora_r, lora_alpha, lora_dropout,
                       lora_rslora, getattr(torch, lora_base_dtype))
    log(f"LoRA r={lora_r} alpha={lora_alpha} on {len(names)} Linears; base: {model.lora_base}")
elif has_lora(model) and not lora_enable:
    raise ValueError(f"{ckpt} has LoRA adapters: train them on with lora_enable=True, or merge them into the "
                     "weights first (python export.py --ckpt=... --merged_dir=...)")
if pretrain_mm_mlp_adapter and init_from != "resume" and not meta:  # a resumed run has its own, trained since
    load_projector(model, pretrain_mm_mlp_adapter)
    log(f"projector from {pretrain_mm_mlp_adapter}")

if tower_data_path and tower_iters and not ckpt:  # rank 0 alone; the others take its weights with the rest
    if master:
        t_tower, tower = time.time(), model.vision_tower.to(device)
        teach_tower(tower, caption_records(tower_data_path, tower_image_folder or image_folder.split(",")[0]),
                    (image_aspect_ratio, tower.image_size, tower.image_mean, tower.image_std), tower_iters, batch_size,
                    mm_vision_tower_lr or learning_rate, device, seed, autocast, every=log_interval,
                    report=lambda step, loss, *_: log(f"tower step {step}/{tower_iters}: pair loss {loss:.4f}"))
        log(f"tower taught on {tower_data_path} in {time.time() - t_tower:.0f} s")
    if ddp:
        dist.barrier(waits)

# what trains, at which lr (stages are configs); with LoRA, the LLM (and a lora_vision_tower) through adapters
model.requires_grad_(False)
parts = [(model.mm_projector, mm_projector_lr or learning_rate)]
if model.region_sampler is not None:  # Ferret: the other new part between tower and LLM, at the projector's lr
    parts.append((model.region_sampler, mm_projector_lr or learning_rate))
if not tune_mm_mlp_adapter:
    if not freeze_backbone:
        parts.append((model.llm, learning_rate))
    if unfreeze_mm_vision_tower or (lora_enable and lora_vision_tower):
        parts.append((model.vision_tower, mm_vision_tower_lr or learning_rate))
for module, lr in parts:
    module.requires_grad_(True)
    if lora_enable and (module is model.llm or (module is model.vision_tower and lora_vision_tower)):
        for name, p in module.named_parameters():
            p.requires_grad_(is_lora(name))
    if module is model.vision_tower:
        # e.g. layers after mm_vision_select_layer: DDP and FSDP want every trainable parameter to get a gradient
        model.vision_tower.freeze_unused()
trained_names = {n for n, p in model.named_parameters() if p.requires_grad}
if has_lora(model):  # what tells, when the adapters are loaded, that their base is still the same (rank 0 saves)
    model.lora_checksum = None if meta else base_checksum(model, trained_names)
if not model.vision_tower.trainable and ptdtype != torch.float32:
    model.vision_tower.to(ptdtype)  # a frozen tower never updates: an fp32 copy would only take memory
log(f"parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M, trainable "
    f"{sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.2f}M; {model.num_image_tokens} tokens "
    "per image")
step_flops = train_flops(model)  # the training FLOPs of a micro-batch, for the MFU in the log
if not peak_flops and device_type == "cuda" and ptdtype != torch.float32:
    peak_flops = gpu_peak_flops(torch.cuda.get_device_name())

# memory and parallelism: the blocks are the units of both
if activation_checkpointing:  # a frozen tower runs without autograd: nothing to keep
    recomputed = blocks(model.llm) + (blocks(model.vision_tower.encoder) if model.vision_tower.trainable else [])
    checkpoint_blocks(recomputed)
    log(f"activation checkpointing: {len(recomputed)} blocks")
if compile:  # block by block (torchtitan's way), before DDP and FSDP: dynamo leaves FSDP2's hooks at their edges eager
    for block in blocks(model.vision_tower.encoder) + blocks(model.llm):
        block.compile()
raw_model = model  # the VLM itself, for its parts and for saving (under FSDP it is the sharded module)
whole = model.state_dict() if fsdp and master else {}  # rank 0's weights for every rank's shards, from before sharding
if fsdp:
    # each block is an FSDP unit: its weights are all-gathered just before it runs and freed after, its
    # gradients reduce-scattered as soon as backward leaves it; the root holds the rest (embeddings,
    # projector, head). Frozen weights are sharded too and get no gradient memory.
    mesh = dist.device_mesh.init_device_mesh(device_type, (world,))
    mp = MixedPrecisionPolicy(param_dtype=ptdtype, reduce_dtype=torch.float32) if ptdtype != torch.float32 \
        else MixedPrecisionPolicy()
    units = blocks(model.vision_tower.encoder) + blocks(model.llm)
    for block in units:
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=fsdp_reshard_after_forward)
    # the root (embeddings, projector, head) keeps its gathered weights: backward starts with them
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    log(f"FSDP: {len(units)} blocks and the root, over {world} processes" +
        ("" if blocks(model.llm) else "; the LLM names no blocks (_no_split_modules): it is sharded as one unit"))
if meta:  # room for rank 0's weights: FSDP's shards, or DDP's whole replica, which DDP broadcasts itself
    model.to_empty(device=device)
    if not fsdp:  # to_empty makes each module's parameters anew: a head tied to the embeddings comes apart
        model.llm.tie_weights()
else:
    model.to(device)  # after LoRA: a base kept in bf16 never sits on the device in fp32
if fsdp:
    take_rank0_weights(model, whole)
    del whole
if world > 1:
    log(f"ranks 1-{world - 1}: the model's shapes on the meta device, then rank 0's weights by broadcast")
torch.manual_seed(seed)  # every rank's random stream (dropout, Ferret's points) the same, whoever drew the init
if ddp and not fsdp:
    model = DDP(model, device_ids=[torch.cuda.current_device()] if device_type == "cuda" else None)

# AdamW over the trainable parameters (FSDP's shards, if sharded), a group per part for its learning rate;
# no weight decay on biases, norms and embeddings
no_decay = {id(p) for m in raw_model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
groups = []
for module, lr in parts:
    params = [p for p in module.parameters() if p.requires_grad]
    decays = [p.dim() >= 2 and id(p) not in no_decay for p in params]
    groups += [{"params": [p for p, d in zip(params, decays) if d], "weight_decay": weight_decay, "base_lr": lr},
               {"params": [p for p, d in zip(params, decays) if not d], "weight_decay": 0.0, "base_lr": lr}]
# fused: one kernel over all parameters, on a GPU and on a CPU too (4-10x foreach's speed there, BENCHMARKS.md)
optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=learning_rate, betas=(beta1, beta2), fused=True)
if init_from == "resume":  # the optimizer state, the data position and the RNG of the checkpoint
    state = load_train_state(ckpt, model, optimizer)

# data --------------------------------------------------------------------------
tower = raw_model.vision_tower
image_args = dict(image_size=tower.image_size, image_mean=tower.image_mean, image_std=tower.image_std,
                  image_aspect_ratio=image_aspect_ratio)
regions = dict(add_region_feature=config["add_region_feature"], no_coor=no_coor, point_input_sample=point_input_sample)
shard_args = dict(tokenizer=tokenizer, num_image_tokens=raw_model.num_image_tokens, model_max_length=model_max_length,
                  regions=regions)


def shards(data, folders, templates, name):
    """A folder of shards made by data.py (checked against this run's tokenizer and settings), or JSON
    files made into shards under out_dir/data/<name> by rank 0 and reused while they are unchanged."""
    path = data if os.path.isdir(data) and read_manifest(data) else os.path.join(out_dir, "data", name)
    if path != data and master:
        preprocess(data, folders, path, version=templates, strict=strict, max_skipped=max_skipped,
                   allow_outside_images=allow_outside_images, **shard_args)
    if ddp:
        dist.barrier(waits)
    d = ShardDataset(path, version=templates, **shard_args, **image_args)
    if d.skipped:
        log(f"{name}: skipped {d.skipped} bad records, listed with their reasons in {path}/skipped.jsonl")
    return d


train_data = shards(data_path, image_folder, version, "train")
val_data = shards(val_data_path, val_image_folder, chat_template(version), "val") if val_data_path else None


def train_epoch(epoch):
    """The global batches of an epoch: seeded by (seed, epoch), so a resumed run takes the same ones."""
    multiples = per_source(data_multiple, train_data.n_sources, "data_multiple values")
    return epoch_batches(train_data.sources, global_batch, seed, epoch, multiples, curriculum,
                         train_data.lengths if group_by_modality_length else None, train_data.has_image)


epoch0 = train_epoch(0)
n_steps = len(epoch0)
if n_steps == 0:  # data_multiple=0 for every file
    raise ValueError(f"an epoch has no records: data_multiple={data_multiple} leaves out all {len(train_data)}")
max_iters = max_iters or n_steps * num_train_epochs
# LLaVA's stages are runs of their own: with curriculum each data file's run of steps gets its own schedule
starts = stage_starts([train_data.sources[b[0]] for b in epoch0] if curriculum else [0], max_iters)
log(f"train: {len(train_data)} records, {n_steps} steps of {global_batch} per epoch; {max_iters} steps")
if curriculum and max_iters > n_steps and train_data.n_sources > 1:  # train stages in runs of their own for that
    log(f"warning: curriculum=True for more than one epoch: step {n_steps} goes back to the first data file")


def loader(dataset, batches):
    # its own generator: a DataLoader would otherwise draw its workers' seed from the global RNG, at a point
    # where a resumed run is not, and dropout would differ after a resume
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=num_workers,
                                       collate_fn=lambda s: collate(s, tokenizer.pad_token_id, raw_model.image_token_id,
                                                                    raw_model.region_token_id, pack_len),
                                       pin_memory=device_type == "cuda", generator=torch.Generator().manual_seed(seed))


pack_len = model_max_length if packing else 0
# packed micro-batches are balanced by cost: a record's tokens, and its images in tokens' worth of the LLM's compute
costs = train_data.lengths + step_flops.tokens_per_image * np.diff(train_data.image_index)


def train_batches():
    """Micro-batches forever, from the saved data position on; state['epoch'/'epoch_step'] track it."""
    while True:
        batches = rank_batches(train_epoch(state["epoch"]), micro_batch, accum, rank, world, state["epoch_step"],
                               costs if packing else None)
        yield from loader(train_data, batches)
        state["epoch"], state["epoch_step"] = state["epoch"] + 1, 0


def answer_questions(ckpt_path, per_type=None):
    """eval.py's accuracies on eval_data_path (per_type: its first of each type), by rank 0 while the others wait."""
    results = {}
    if master:
        eval_model = load(ckpt_path, device)[0] if fsdp else raw_model  # FSDP: gathered, from the checkpoint
        results = evaluate(eval_model, tokenizer, eval_data_path, eval_image_folder, chat_template(version),
                           image_aspect_ratio, no_coor=no_coor, per_type=per_type)
        record({f"accuracy/{t}": results[t] for t in results["n_questions"]})
    if ddp:
        dist.barrier(waits)
    return results


def record(stats):  # out_dir/log.jsonl, one JSON object per line (plot.py draws it), and wandb
    if master:
        with open(os.path.join(out_dir, "log.jsonl"), "a") as f:
            f.write(json.dumps({"step": state["iter"], **stats}) + "\n")
        if wandb_log:  # its numbers (not the stage starts)
            wandb.log({k: v for k, v in stats.items() if isinstance(v, (int, float))}, step=state["iter"])


def save(keep=keep_last):  # with every process; the LLM frozen (stage 1), what trained alone too (mm_projector.bin)
    return save_checkpoint(out_dir, state, model, raw_model, optimizer, tokenizer, {"train": config}, keep,
                           trained_names if tune_mm_mlp_adapter or freeze_backbone else None, waits)


# training loop -----------------------------------------------------------------
if master:  # a resumed run's log goes on from its checkpoint's step
    trim_log(os.path.join(out_dir, "log.jsonl"), state["iter"])
    if wandb_log:
        import wandb
        wandb.init(project=wandb_project, name=wandb_run_name, config=config, dir=out_dir)
record({"stage_starts": starts})
stop_on_signals()  # preemption: a checkpoint at the next step boundary, then out
model.train()  # a frozen tower stays in eval mode (VisionTower.train): no dropout, BatchNorm statistics kept
batches = train_batches()
t_start, start_iter = time.time(), state["iter"]
t_log, counts, ckpt_path, bad_steps = t_start, np.zeros(4), None, 0  # counts since the last log line
while state["iter"] < max_iters:
    it = state["iter"]
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] * lr_multiplier(it, starts, max_iters, warmup_iters, warmup_ratio,
                                               min_lr / learning_rate)
    # counted on the CPU, before the batches go to the device: no waiting for the device in the loop
    micro_batches = [next(batches) for _ in range(accum)]
    n_tokens = [int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro_batches]
    for b, n in zip(micro_batches, n_tokens):
        if n:  # not a stand-in for an empty micro-batch
            counts += (int(b["attention_mask"].sum()), n, step_flops(b), b["input_ids"].numel())
    # the step's loss is the mean over all trained tokens of the global batch, however the batch is
    # split over processes and micro-steps: weigh each micro-batch's mean by its share of the tokens
    # (DDP and FSDP then average the processes' gradients, hence the factor world)
    flags = torch.tensor([float(sum(n_tokens)), float(bool(STOP))], pin_memory=device_type == "cuda")
    flags = flags.to(device, non_blocking=True)  # from pinned memory: the host does not wait for the device
    if ddp:  # the global batch's trained tokens, and in the same collective: was any process asked to stop?
        dist.all_reduce(flags)
    n_global = flags[0]
    loss_sum = torch.zeros((), device=device)
    for micro, batch in enumerate(micro_batches):
        if ddp and not fsdp:
            model.require_backward_grad_sync = micro == accum - 1  # all-reduce once per step (FSDP: every micro-step)
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with autocast:
            loss = model(batch) * (n_tokens[micro] * world / n_global)
        loss.backward()
        loss_sum += loss.detach()
    if curriculum and train_data.sources[epoch0[it % n_steps][0]] < llm_from_stage:  # LLaVA's stage 1, in this run
        raw_model.llm.zero_grad()  # the LLM frozen: its gradients (computed all the same) dropped before the step
    grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip or float("inf"))
    grad_norm = grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm  # FSDP: over all shards
    # the one wait for the device in a step; grad_norm is the same on every rank (of the all-reduced gradients)
    finite, stop = torch.stack([torch.isfinite(grad_norm).float(), flags[1]]).tolist()
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    state["iter"], state["epoch_step"] = state["iter"] + 1, state["epoch_step"] + 1
    if not finite:  # skipped, up to max_bad_steps; then a checkpoint of the weights before it, and stop
        bad_steps += 1
        if bad_steps > max_bad_steps:
            raise FloatingPointError(f"step {it + 1}: loss {loss_sum.item()}, gradient norm {grad_norm.item()}; "
                                     f"stopped before the weights are damaged, which {save(None)} holds")
        log(f"step {it + 1}: a non-finite loss or gradient, not applied ({bad_steps} of max_bad_steps={max_bad_steps})")
    if state["iter"] % log_interval == 0 or state["iter"] == max_iters:
        stats = interval_stats(loss_sum, counts, time.time() - t_log, optimizer.param_groups[0]["lr"], grad_norm,
                               peak_flops, device)
        log(log_line(state["iter"], max_iters, stats, time.time() - t_start, state["iter"] - start_iter))
        record({**stats, "elapsed_s": round(time.time() - t_start, 2)})  # wall time, evaluations included
        t_log, counts = time.time(), np.zeros(4)
    if state["iter"] % eval_interval == 0 or state["iter"] == max_iters:
        t_eval = time.time()
        if val_data is not None:
            fixed = rank_batches(global_batches(np.arange(len(val_data)), micro_batch * world), micro_batch, 1, rank,
                                 world)[:eval_iters]
            val, shuffled = val_losses(raw_model, loader(val_data, fixed), device, autocast)
            log(f"step {it + 1}: val loss {val:.4f}, with shuffled images {shuffled:.4f} (gap {shuffled - val:+.4f})")
            record({"val/loss": val, "val/loss_shuffled_images": shuffled})
            if not math.isfinite(val):  # never saved as a checkpoint
                raise FloatingPointError(f"step {state['iter']}: val loss {val}, not saved; last: {ckpt_path or ckpt}")
        ckpt_path = save()
        if eval_subset and eval_data_path and state["iter"] < max_iters:  # the last step gets the whole eval
            acc = answer_questions(ckpt_path, eval_subset)
            log(f"step {state['iter']}: accuracy " + ", ".join(f"{t} {acc[t]:.3f}" for t in acc.get("n_questions", [])))
        t_log += time.time() - t_eval  # evaluation and saving are not training time
    if stop:  # preemption, agreed by every process: a checkpoint of this step, then out
        break

preempted = state["iter"] < max_iters  # stopped by a signal: a checkpoint of the last step, then out
if preempted and not (ckpt_path or "").endswith(f"-{state['iter']:07d}"):
    ckpt_path = save()
log(f"trained {state['iter'] - start_iter} steps in {(time.time() - t_start) / 60:.1f} min; checkpoint: {ckpt_path}")
if preempted:
    log(f"stopped by a signal at step {state['iter']}: {ckpt_path} holds the run; the same command with "
        "--init_from=resume goes on from there")
elif eval_data_path and ckpt_path:
    results = answer_questions(ckpt_path, eval_final)
    if master:
        report(results, os.path.join(out_dir, "eval.json"))
if master:
    log(f"curves: {plot_curves(out_dir)}")
    if wandb_log:
        wandb.finish(exit_code=PREEMPTED * preempted)
unlock(out_dir)  # rank 0's, which holds it
if ddp:
    exit_distributed(PREEMPTED * preempted, waits)
sys.exit(PREEMPTED * preempted)
