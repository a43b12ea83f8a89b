"""
What train.py needs around its loop, beside the model (bench.py measures some of it): torch.distributed's
setup and end; the repeated blocks of a Hugging Face model, which are the units of activation checkpointing
and of FSDP; activation checkpointing itself; the FLOPs of a step with the device's peak, for the MFU, and
the log line and log.jsonl; the lr schedule of each stage; the val losses; the preemption signals; and the
check of every setting.
"""
import functools
import json
import math
import os
import resource
import signal
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import FSDPModule
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

import lora
from conversation import IGNORE_INDEX

# dense bf16 tensor-core peaks, by a part of the device's name
PEAK_BF16 = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200 NVL": 835e12, "H200": 989e12,
             "GH200": 989e12, "B200": 2250e12, "A100": 312e12, "L40S": 362e12, "L40": 181e12, "L4": 121e12}


def blocks(module):
    """The repeated blocks of a Hugging Face model: its decoder or encoder layers (the classes that it names
    in _no_split_modules, where they sit in a ModuleList; the outermost where they nest, as ConvNeXt's
    stages hold its layers). They are the units of activation checkpointing and of FSDP (train.py)."""
    kinds, out, inside = set(getattr(module, "_no_split_modules", None) or ()), [], set()
    for m in module.modules():
        if isinstance(m, nn.ModuleList):
            for child in m:
                if type(child).__name__ in kinds and id(child) not in inside:
                    out.append(child)
                    inside.update(id(x) for x in child.modules())
    return out


def checkpoint_blocks(modules):
    """Activation checkpointing: each block keeps only its inputs in forward, and runs again in backward to
    get the activations its gradients need (torch.utils.checkpoint, non-reentrant: keyword arguments and
    the dropout RNG are handled). Activation memory falls from all blocks' to one block's, for about one
    more forward of compute."""
    for block in modules:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def train_flops(model):
    """-> flops(batch): an estimate of the FLOPs of a training step (forward and backward) on a batch, for
    the MFU in train.py's log. The LLM: 2 per weight and token forward, plus attention (4 x layers x width
    per token and position attended to), plus its head on the trained positions only (the loss makes no
    other logits). The tower: its forward on one image, measured here once, per image. Each part counts
    1x its forward when it only runs forward (a frozen tower), 2x when gradients pass through it to a part
    that trains (a frozen or LoRA LLM under the projector), 3x when its own weights train (the 6N rule);
    attention 3x whenever gradients pass. Padding is not counted: MFU credits the model's work only; nor is
    the region sampler (a few MLPs over some hundred points a region).
    Call it while the model is whole (before FSDP) and its trainable parameters are set."""
    from torch.utils.flop_counter import FlopCounterMode

    def passes(module, under_trained):
        grads_through = under_trained or any(p.requires_grad for p in module.parameters())
        return 1 + grads_through + any(p.requires_grad and not lora.is_lora(n) for n, p in module.named_parameters())

    llm, tower = model.llm, model.vision_tower
    embeddings = {id(p) for m in llm.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    head = llm.get_output_embeddings().weight
    body = sum(p.numel() for n, p in llm.named_parameters()
               if id(p) not in embeddings and p is not head and not lora.is_lora(n))
    adapters = sum(p.numel() for n, p in llm.named_parameters() if lora.is_lora(n))  # they train: 3x
    layers, width, vocab = llm.config.num_hidden_layers, llm.config.hidden_size, head.shape[0]
    llm_passes, tower_passes = passes(llm, True), passes(tower, False)  # the projector always trains
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        p = next(tower.parameters())
        tower(torch.zeros(1, 3, tower.image_size, tower.image_size, device=p.device, dtype=p.dtype))
    per_image = [counter.get_total_flops()]
    if dist.is_initialized():  # rank 0's count for all: on the meta device (the others' model) some ops count apart,
        dist.broadcast_object_list(per_image, 0)  # and packed micro-batches must be dealt alike on every rank
    per_image = per_image[0]

    def flops(batch):
        tokens = batch["attention_mask"].sum().double()
        trained = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        # each token attends to those of its record before it and itself (position_ids restart per packed record)
        positions = batch.get("position_ids", batch["attention_mask"].cumsum(1) - 1)
        attended = ((positions + 1) * batch["attention_mask"]).sum().double()
        # attention multiplies activations by activations: a backward through it is always 2 forwards
        attention = (3 if llm_passes > 1 else 1) * 4 * layers * width * 2 * attended
        return float(llm_passes * (2 * body * tokens + 2 * width * vocab * trained) + attention
                     + 3 * 2 * adapters * tokens + tower_passes * per_image * len(batch["pixel_values"]))
    # what an image costs in tokens' worth of the LLM, for balancing packed micro-batches (data.deal)
    flops.tokens_per_image = tower_passes * per_image / (llm_passes * 2 * body + 3 * 2 * adapters or 1)
    return flops


def gpu_peak_flops(device_name):
    """The device's dense bf16 peak FLOP/s from PEAK_BF16 (the longest name in it that the device's holds: an
    "H200 NVL" is not an "H200"), or 0 for a device not in it (set peak_flops then)."""
    names = [k for k in PEAK_BF16 if k in device_name]
    return PEAK_BF16[max(names, key=len)] if names else 0.0


def interval_stats(loss_sum, counts, seconds, lr, grad_norm, peak_flops, device):
    """The numbers of a log line, over all processes: the global batch's loss (the mean of theirs), their
    counts (tokens, trained tokens, FLOPs, positions: tokens and padding) since the last line, per second
    and summed, the share of positions that were padding, and the largest peak memory (CUDA: allocated since
    the last line; CPU: the process's resident peak). One wait for the device."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    memory = torch.cuda.max_memory_allocated() if device.startswith("cuda") else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    sums = torch.cat([loss_sum.reshape(1).float(), torch.tensor(counts, dtype=torch.float32, device=device)])
    memory = torch.tensor(float(memory), device=device)
    if dist.is_initialized():
        dist.all_reduce(sums)
        dist.all_reduce(memory, op=dist.ReduceOp.MAX)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    loss, tokens, trained, flops, positions, memory, grad_norm = \
        torch.cat([sums, memory.reshape(1), grad_norm.reshape(1).float()]).tolist()
    return {"train/loss": loss / world, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens / seconds,
            "trained_tokens_per_s": trained / seconds, "padding": 1 - tokens / max(positions, 1),
            "tflops_per_process": flops / seconds / world / 1e12, "peak_memory_gib": memory / 2**30,
            **({"mfu": flops / seconds / (world * peak_flops)} if peak_flops else {})}


def stage_starts(sources, max_iters):
    """The steps below max_iters at which a stage starts: 0, and each step whose records come from another
    data file than the step before's (curriculum: captions, then conversations, epoch after epoch).
    sources: the data file of each step of an epoch."""
    n = len(sources)
    return [0] + [it for it in range(1, max_iters) if sources[it % n] != sources[(it - 1) % n]]


def lr_multiplier(it, starts, max_iters, warmup_iters, warmup_ratio, floor):
    """Of each group's base lr at step it: linear warmup, then cosine down to floor, within the stage that
    step it is in (starts: stage_starts); warmup_iters, or else warmup_ratio of the stage's steps."""
    begin = max(s for s in starts if s <= it)
    end = min([s for s in starts if s > it] + [max_iters])
    warmup, t = warmup_iters or round(warmup_ratio * (end - begin)), it - begin
    if t < warmup:
        return (t + 1) / (warmup + 1)
    progress = min(1.0, (t - warmup) / max(1, end - begin - warmup))
    return floor + 0.5 * (1.0 - floor) * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def val_losses(model, batches, device, autocast):
    """The mean loss over batches, and the same with each image moved to the next record of its batch: their
    gap is how much the model looks at the images (0: it answers from text alone). Over all processes."""
    model.eval()
    sums = torch.zeros(3, device=device)
    for batch in batches:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        n = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()  # the mean over tokens, as in training
        with autocast:
            sums[0] += model(batch) * n
            sums[1] += model({**batch, "pixel_values": batch["pixel_values"].roll(1, 0)}) * n
        sums[2] += n
    if dist.is_initialized():
        dist.all_reduce(sums)
    reshard(model)  # FSDP: without a backward, ZeRO-2 units would stay gathered, out of step with the optimizer
    model.train()  # a frozen tower stays in eval mode (VisionTower.train)
    return (sums[0] / sums[2]).item(), (sums[1] / sums[2]).item()


def log_line(step, max_iters, stats, elapsed, steps_run):
    """train.py's line of the stats of the last log_interval steps (tests/conftest.py reads it back)."""
    mfu = f", MFU {100 * stats['mfu']:.1f}%" if "mfu" in stats else ""
    return (f"step {step}/{max_iters} | loss {stats['train/loss']:.4f} | lr {stats['lr']:.2e} | "
            f"grad {stats['grad_norm']:.2f} | {stats['tokens_per_s']:.0f} tok/s ({stats['trained_tokens_per_s']:.0f} "
            f"trained, padding {100 * stats['padding']:.0f}%) | {stats['tflops_per_process']:.3g} TFLOP/s per "
            f"process{mfu} | peak mem {stats['peak_memory_gib']:.2f} GiB | {elapsed / 60:.1f} min, "
            f"ETA {(max_iters - step) * elapsed / steps_run / 60:.1f} min")


def trim_log(path, step):
    """Keep the lines of a log.jsonl up to step: those of steps after a resumed checkpoint are done again."""
    if os.path.exists(path):
        with open(path) as f:
            lines = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
        with open(f"{path}.tmp", "w") as f:
            f.writelines(lines)
        os.replace(f"{path}.tmp", path)  # a kill while writing leaves the old log, not half of it


def init_distributed(device, timeout):
    """Under torchrun: the process group (NCCL on CUDA, gloo on a CPU), whose collectives wait `timeout`
    seconds for a stuck or dead rank before the job ends, this process's GPU, and a gloo group that waits a
    day, for the work rank 0 does alone (preprocessing, the final evaluation). -> (rank, world, device, that
    group), or (0, 1, device, None) in one process."""
    if int(os.environ.get("RANK", -1)) == -1:
        return 0, 1, device, None
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo", timeout=timedelta(seconds=timeout))
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device, dist.new_group(backend="gloo", timeout=timedelta(days=1))


def split_batch(batch_size, gradient_accumulation_steps, world):
    """-> (accumulation steps, micro-batch) per process: the processes share the accumulation steps when they
    divide evenly, else each micro-batch (so the default also runs on 2 processes)."""
    if gradient_accumulation_steps % world == 0:
        return gradient_accumulation_steps // world, batch_size
    if batch_size % world == 0 and gradient_accumulation_steps == 1:
        return 1, batch_size // world
    raise ValueError(f"{world} processes cannot share gradient_accumulation_steps={gradient_accumulation_steps} "
                     f"or batch_size={batch_size}: make one of them divisible by {world}")


def take_rank0_weights(model, whole):
    """FSDP, the ranks other than 0 having built the model on the meta device (and to_empty'd it): every rank's
    shards from rank 0's whole state_dict (whole; {} on the others), by broadcast, and the buffers that a
    state_dict leaves out (rotary inv_freq, position ids) too."""
    persistent = set(model.state_dict())
    set_model_state_dict(model, whole, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for name, buffer in model.named_buffers():
        if name not in persistent:
            dist.broadcast(buffer, 0)


def reshard(model):
    """Free FSDP's gathered weights (after a forward without a backward, which would have)."""
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def exit_distributed(code=0, group=None):
    """The end of a torchrun process, once everything is written; group: the one to wait in for rank 0."""
    dist.barrier(group)  # no rank leaves while rank 0 still writes
    dist.destroy_process_group()
    # gloo's threads can still hold the last collectives' tensors, and letting go of them while Python shuts
    # down aborts a process now and then (pytorch issue 190489); everything is written: leave without that
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


STOP = []  # the signals (and their times) that asked this process to stop; train.py looks at each step
PREEMPTED = 75  # the exit code of a run stopped by a signal after its checkpoint (sysexits' EX_TEMPFAIL: run again)


def stop_on_signals():
    """Preemption: SIGTERM (SLURM's, or torchrun's forwarding of it), SIGINT (Ctrl-C) or SIGUSR1 (SLURM's
    --signal) asks for a checkpoint and an exit at the next step boundary; a second signal, a second or more
    later, stops at once (one sooner is the same one sent twice: SLURM signals torchrun's workers too, and
    torchrun forwards its own)."""
    def ask(signum, frame):
        if STOP and time.time() - STOP[0][1] > 1:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        STOP.append((signum, time.time()))
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(s, ask)


DTYPES = ("float32", "bfloat16", "float16")
CHOICES = {"dtype": DTYPES, "lora_base_dtype": DTYPES, "parallel": ("ddp", "fsdp"),
           "image_aspect_ratio": ("pad", "square_nocrop", "crop"),
           "mm_vision_select_feature": ("patch", "cls_patch"), "sampler_pooler_mode": ("mean", "max"),
           "attn_implementation": (None, "sdpa", "eager", "flex_attention", "flash_attention_2"),
           "point_input_sample": ("center", "gaussian", "segment_mask|uniform", "segment_mask|center")}
AT_LEAST = {"batch_size": 1, "gradient_accumulation_steps": 1, "eval_interval": 1, "log_interval": 1, "eval_iters": 1,
            "keep_last": 1, "model_max_length": 1, "num_train_epochs": 1, "lora_r": 1, "mm_patch_merge": 1,
            "max_iters": 0, "warmup_iters": 0, "num_workers": 0, "weight_decay": 0, "grad_clip": 0, "min_lr": 0,
            "peak_flops": 0, "lora_alpha": 0, "max_bad_steps": 0, "llm_from_stage": 0,
            "eval_subset": 0, "eval_final": 0, "tower_iters": 0}
BETWEEN = {"warmup_ratio": (0, 1), "max_skipped": (0, 1)}
BELOW_ONE = ("beta1", "beta2", "lora_dropout")  # at least 0, less than 1


def check_settings(c):
    """train.py's settings, each against what it can be, before anything is built: an error names the first
    that is not, and what it may be."""
    for k, allowed in CHOICES.items():
        if c[k] not in allowed:
            raise ValueError(f"{k}={c[k]!r}: use one of {', '.join(map(repr, allowed))}")
    for k, low in AT_LEAST.items():
        if not isinstance(c[k], (int, float)) or c[k] < low:
            raise ValueError(f"{k}={c[k]!r}: must be a number of at least {low}")
    for k, (low, high) in BETWEEN.items():
        if not isinstance(c[k], (int, float)) or not low <= c[k] <= high:
            raise ValueError(f"{k}={c[k]!r}: must be between {low} and {high}")
    for k in BELOW_ONE:
        if not isinstance(c[k], (int, float)) or not 0 <= c[k] < 1:
            raise ValueError(f"{k}={c[k]!r}: must be at least 0 and less than 1")
    for k in ("learning_rate", "dist_timeout"):
        if not isinstance(c[k], (int, float)) or c[k] <= 0:
            raise ValueError(f"{k}={c[k]!r}: must be a positive number")
    for k in ("mm_projector_lr", "mm_vision_tower_lr"):
        if c[k] is not None and (not isinstance(c[k], (int, float)) or c[k] <= 0):
            raise ValueError(f"{k}={c[k]!r}: must be None (learning_rate) or a positive number")
    if c["lora_enable"] and (c["tune_mm_mlp_adapter"] or c["freeze_backbone"]):
        raise ValueError("lora_enable=True trains the LLM through adapters: it cannot also be frozen "
                         "(tune_mm_mlp_adapter or freeze_backbone)")
    if c["packing"] and c["attn_implementation"] == "flash_attention_2":
        raise ValueError("packing=True with attn_implementation='flash_attention_2': transformers reads packed records "
                         "from position_ids for flash-attention in a batch of one row only, and collate packs "
                         "several: use 'sdpa' or 'flex_attention'")
    if c["tower_data_path"] and c["tower_iters"] and c["lora_enable"]:
        raise ValueError("tower_data_path with lora_enable=True: the LoRA base is saved before the tower is taught; "
                         "teach it in a run without LoRA, then train adapters from that run's checkpoint with "
                         "tower_data_path=''")
    if c["llm_from_stage"] and not c["curriculum"]:
        raise ValueError(f"llm_from_stage={c['llm_from_stage']} needs curriculum=True: the stages are its data files")
    if c["min_lr"] > c["learning_rate"]:
        raise ValueError(f"min_lr={c['min_lr']} is above learning_rate={c['learning_rate']}: the cosine decays "
                         "to min_lr")
