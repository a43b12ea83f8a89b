"""
What a training step needs at scale, beside the model (train.py uses it; bench.py measures it): the repeated
blocks of a Hugging Face model, which are the units of activation checkpointing and of FSDP; activation
checkpointing itself; and the FLOPs of a step with the device's peak, for the MFU in the log.
"""
import functools
import os
import resource
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

import lora
from conversation import IGNORE_INDEX

# dense bf16 tensor-core peaks, by a part of the device's name (the first that matches: the more specific first)
PEAK_BF16 = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "GH200": 989e12, "B200": 2250e12,
             "A100": 312e12, "L40S": 362e12, "L40": 181e12, "L4": 121e12}


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
    per_image = counter.get_total_flops()

    def flops(batch):
        lengths = batch["attention_mask"].sum(1).double()
        trained = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        # attention multiplies activations by activations: a backward through it is always 2 forwards
        attention = (3 if llm_passes > 1 else 1) * 4 * layers * width * (lengths ** 2).sum()
        return float(llm_passes * (2 * body * lengths.sum() + 2 * width * vocab * trained) + attention
                     + 3 * 2 * adapters * lengths.sum() + tower_passes * per_image * len(batch["pixel_values"]))
    return flops


def gpu_peak_flops(device_name):
    """The device's dense bf16 peak FLOP/s from PEAK_BF16, or 0 for a device not in it (set peak_flops then)."""
    return next((v for k, v in PEAK_BF16.items() if k in device_name), 0.0)


def interval_stats(loss_sum, counts, seconds, lr, grad_norm, peak_flops, device):
    """The numbers of a log line, over all processes: the global batch's loss (the mean of theirs), their
    counts of tokens, trained tokens and FLOPs since the last line per second, summed, and the largest peak
    memory (CUDA: allocated since the last line; CPU: the process's resident peak)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    memory = torch.cuda.max_memory_allocated() if device.startswith("cuda") else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    sums, memory = torch.tensor([loss_sum.item(), *counts], device=device), torch.tensor(float(memory), device=device)
    if dist.is_initialized():
        dist.all_reduce(sums)
        dist.all_reduce(memory, op=dist.ReduceOp.MAX)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    tokens_per_s, trained_per_s, flops_per_s = (sums[1:] / seconds).tolist()
    return {"train/loss": sums[0].item() / world, "lr": lr, "grad_norm": grad_norm.item(), "tokens_per_s": tokens_per_s,
            "trained_tokens_per_s": trained_per_s, "tflops_per_process": flops_per_s / world / 1e12,
            "peak_memory_gib": memory.item() / 2**30,
            **({"mfu": flops_per_s / (world * peak_flops)} if peak_flops else {})}


def log_line(step, max_iters, stats, elapsed, per_step):
    """train.py's line of the stats of the last log_interval steps (tests/conftest.py reads it back)."""
    mfu = f", MFU {100 * stats['mfu']:.1f}%" if "mfu" in stats else ""
    return (f"step {step}/{max_iters} | loss {stats['train/loss']:.4f} | lr {stats['lr']:.2e} | "
            f"grad {stats['grad_norm']:.2f} | {stats['tokens_per_s']:.0f} tok/s ({stats['trained_tokens_per_s']:.0f} "
            f"trained) | {stats['tflops_per_process']:.3g} TFLOP/s per process{mfu} | peak mem "
            f"{stats['peak_memory_gib']:.2f} GiB | {elapsed / 60:.1f} min, "
            f"ETA {(max_iters - step) * per_step / 60:.1f} min")


def exit_distributed():
    """The end of a torchrun process, once everything is written."""
    dist.barrier()  # no rank leaves while rank 0 still writes
    dist.destroy_process_group()
    # gloo's threads can still hold the last collectives' tensors, and letting go of them while Python shuts
    # down aborts a process now and then (pytorch issue 190489); everything is written: leave without that
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
