"""
Checkpoints: a trained model in a folder, and a run's state beside it so that it resumes exactly.

out_dir/ckpt-<step>/ holds config.json (the model's settings under "model", the run's under "train"),
model.safetensors (with LoRA: only what trains, and config.json names the folder of the frozen base),
trainable.safetensors (stage 1: the projector alone, LLaVA's mm_projector.bin), optimizer/ (AdamW's state
as torch.distributed.checkpoint shards, one per process, resumable on any number of processes), state.json
(step, data position, every process's RNG), the tokenizer, and complete.json, written last (every other
file's size and CRC-32). It is written under a .tmp name and renamed when complete, so a crash never leaves
a half-written checkpoint; a checkpoint damaged since is found (damage) and passed over for the one before
it (newest). One run at a time holds an out_dir (lock). LLaVA's safe_save_model_for_hf_trainer,
get_mm_adapter_state_maybe_zero_3 and maybe_zero_3 are get_model_state_dict with full_state_dict=True here:
the weights gathered from FSDP's shards onto rank 0's CPU.
"""
import atexit
import contextlib
import json
import math
import os
import re
import shutil
import socket
import sys
import time
import zlib
from dataclasses import asdict, fields

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, load_model, save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)

import lora
from hf_llava import from_hf_llava, is_hf_llava
from model import VLM, VLMConfig, on_meta

STEP = re.compile(r"ckpt-(\d+)")  # a checkpoint's folder in out_dir

def save(model, path, extra_config=None, state=None):
    """Write config.json and model.safetensors into the folder `path`: the model's weights, or `state`,
    the same gathered from FSDP's shards (train.py). A model with LoRA adapters writes only what trains,
    and under "lora" in config.json the adapters' settings and model.lora_base, the folder of the frozen
    rest (train.py sets it; lora.merge_lora first to save the whole model)."""
    os.makedirs(path, exist_ok=True)
    adapters = None
    if lora.has_lora(model):
        if not getattr(model, "lora_base", None):
            raise ValueError("a model with LoRA adapters saves only what trains: set model.lora_base to the "
                             "folder of its base, or merge_lora it first")
        adapters = {**lora.lora_config(model), "base": model.lora_base, "base_checksum": model.lora_checksum}
        state = lora.lora_state_dict(model) if state is None else state
    elif state is None:
        state = model.state_dict()
    # one name for a weight that has several (tied embeddings): safetensors stores a tensor once
    names = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    again = {n for group in names.values() for n in group[1:]}
    state = {k: v.contiguous() for k, v in state.items() if k not in again}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"model": asdict(model.config), **({"lora": adapters} if adapters else {}), **(extra_config or {})},
                  f, indent=1)
    save_file(state, os.path.join(path, "model.safetensors"))


def checkpoints(out_dir):
    """out_dir's checkpoints, oldest first: its folders named ckpt-<step>, by step (a .tmp one was cut short;
    other names, a copy ckpt-best say, are not the run's), that hold complete.json, the file written last (or,
    written before there was one, config.json, model.safetensors and state.json)."""
    names = [n for n in os.listdir(out_dir) if STEP.fullmatch(n)] if os.path.isdir(out_dir) else []
    paths = [os.path.join(out_dir, n) for n in sorted(names, key=lambda n: int(n[5:]))]
    return [p for p in paths if os.path.exists(os.path.join(p, "complete.json")) or
            all(os.path.exists(os.path.join(p, f)) for f in ("config.json", "model.safetensors", "state.json"))]


def file_crc(path):
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


WEIGHTS = ("model.safetensors", "trainable.safetensors")  # what a model is loaded from (config.json may be edited)


def damage(path, checksums=True, names=None):
    """Why the checkpoint folder `path` cannot be trusted, or None: a file that complete.json lists (of
    `names`, if given) is missing, of another size, or (checksums) of another CRC-32 than when it was written."""
    manifest = os.path.join(path, "complete.json")
    if not os.path.exists(manifest):  # written before complete.json was, or not a glimpse run's checkpoint
        missing = [f for f in ("config.json", "model.safetensors") if not os.path.exists(os.path.join(path, f))]
        return f"{missing[0]} is missing" if missing else None
    try:
        with open(manifest) as f:
            files = {name: (int(size), int(crc)) for name, (size, crc) in json.load(f)["files"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"complete.json is unreadable ({type(e).__name__}: {e})"
    for name, (size, crc) in files.items():
        if names is not None and name not in names:
            continue
        f = os.path.join(path, name)
        if not os.path.exists(f):
            return f"{name} is missing"
        if os.path.getsize(f) != size:
            return f"{name} holds {os.path.getsize(f)} bytes, not the {size} it was written with"
        if checksums and file_crc(f) != crc:
            return f"{name} has changed since it was written (its CRC-32 differs)"
    return None


def warn(message):
    print(message, file=sys.stderr, flush=True)


def newest(out_dir, warn=warn, names=None):
    """out_dir's newest checkpoint that is whole (in its files `names`: WEIGHTS to load a model, all to
    resume), or None. A damaged newer one is reported to warn, named with what is wrong, and left where it is."""
    for path in reversed(checkpoints(out_dir)):
        reason = damage(path, names=names)
        if reason is None:
            return path
        warn(f"warning: {path} is damaged ({reason}): skipping it for the checkpoint before it")
    return None


def find_checkpoint(init_from, out_dir, warn=warn):
    """train.py's init_from -> the checkpoint folder to start from, or None (scratch): 'resume' is out_dir's
    newest whole one; an out_dir is its newest; a folder (a checkpoint, a transformers LLaVA folder) is itself.
    Under torchrun rank 0 reads the checkpoints (every byte, for their CRC-32s) and the others take its choice."""
    if dist.is_initialized():
        choice = [find_checkpoint_here(init_from, out_dir, warn) if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(choice)
        return choice[0]
    return find_checkpoint_here(init_from, out_dir, warn)


def find_checkpoint_here(init_from, out_dir, warn):
    if init_from == "scratch":
        return None
    folder = out_dir if init_from == "resume" else init_from
    if init_from != "resume" and not checkpoints(folder):
        return init_from
    path = newest(folder, warn)
    if path is None:
        raise FileNotFoundError(f"init_from={init_from!r} but {folder} holds no checkpoint (none complete and whole)")
    return path


def load(path, device="cpu"):
    """Rebuild a VLM from config.json (random init) and load model.safetensors into it. A transformers
    LLaVA folder loads too (its config comes back under "hf_llava")."""
    if is_hf_llava(path):
        model = from_hf_llava(path)
        return model if on_meta() else model.to(device), {"model": asdict(model.config), "hf_llava": str(path)}
    cfg_file, weights = os.path.join(path, "config.json"), os.path.join(path, "model.safetensors")
    for f in (cfg_file, weights):
        if not os.path.exists(f):
            raise FileNotFoundError(f"{f}: not a glimpse checkpoint (missing {os.path.basename(f)})")
    reason = damage(path, checksums=False, names=WEIGHTS)
    if reason:
        raise ValueError(f"{path}: a damaged checkpoint: {reason}")
    try:
        with open(cfg_file) as f:
            config = json.load(f)
    except ValueError as e:
        raise ValueError(f"{cfg_file}: not valid JSON ({e})") from e
    if "lora" in config:  # the frozen base from its folder, then the adapters and what else trained
        return load_lora(path, config, device), config
    model = VLM(model_config(config["model"], cfg_file))
    if on_meta():  # its shapes only: a rank other than 0 gets its weights from rank 0 (train.py)
        return model, config
    try:
        load_model(model, weights, device=str(device))
    except Exception as e:
        raise RuntimeError(f"{weights}: cannot load the weights ({e})") from e
    return model.to(device), config


def load_lora(path, config, device="cpu"):
    """A LoRA checkpoint: its base (a plain checkpoint or LLaVA folder, config["lora"]["base"]) with the
    same adapters applied, then model.safetensors on top. merge_lora makes it a plain model again."""
    c = config["lora"]
    if not os.path.exists(c["base"]):
        raise FileNotFoundError(f"{path} holds LoRA adapters for the base {c['base']}, which is missing")
    model, _ = load(c["base"], device)
    lora.apply_lora(model, c["targets"], c["r"], c["alpha"], c["dropout"], c["rslora"], getattr(torch, c["base_dtype"]))
    model.lora_base = c["base"]
    if on_meta():  # rank 0 reads and checks the adapters
        return model
    try:
        state = load_file(os.path.join(path, "model.safetensors"), device=str(device))
    except Exception as e:
        raise RuntimeError(f"{path}/model.safetensors: cannot read the LoRA weights ({e})") from e
    model.lora_checksum = lora.base_checksum(model, state)
    if not math.isclose(model.lora_checksum, c["base_checksum"], rel_tol=1e-9):
        raise ValueError(f"{path}: its base {c['base']} is not the one its adapters were trained on (it has changed)")
    try:
        lora.load_lora_state_dict(model, state)
    except Exception as e:
        raise RuntimeError(f"{path}: cannot load the LoRA weights onto {c['base']} ({e})") from e
    return model


def load_projector(model, path):
    """Start from a trained projector (LLaVA's pretrain_mm_mlp_adapter: stage 2 from stage 1): a glimpse
    checkpoint folder (its trainable.safetensors, else model.safetensors) or out_dir (its newest), a
    .safetensors file, or LLaVA's mm_projector.bin (tensors only: torch.load with weights_only=True). The
    keys are those that end in mm_projector.<name>; names and shapes must fit this model's projector."""
    if os.path.isdir(path) and checkpoints(path):  # a run's out_dir: its newest whole checkpoint
        whole = newest(path, names=WEIGHTS)
        if whole is None:
            raise ValueError(f"pretrain_mm_mlp_adapter={path}: none of its checkpoints is whole")
        path = whole
    if os.path.isdir(path):  # what trained in that run alone if it was written, else the whole model
        trainable = os.path.join(path, "trainable.safetensors")
        path = trainable if os.path.exists(trainable) else os.path.join(path, "model.safetensors")
    try:
        state = load_file(path) if path.endswith(".safetensors") else \
            torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RuntimeError(f"pretrain_mm_mlp_adapter={path}: cannot read it ({e})") from e
    weights = {k.split("mm_projector.", 1)[1]: v for k, v in state.items() if "mm_projector." in k}
    if not weights:
        raise ValueError(f"pretrain_mm_mlp_adapter={path}: it holds no mm_projector weights")
    try:
        model.mm_projector.load_state_dict(weights)
    except RuntimeError as e:
        raise ValueError(f"pretrain_mm_mlp_adapter={path} does not fit this model's projector: {e}") from e


def model_config(settings, where):
    """config.json's "model" -> VLMConfig. A setting it lacks (a checkpoint from before that setting was)
    takes its default, which is what such a checkpoint was built with."""
    unknown = sorted(set(settings) - {f.name for f in fields(VLMConfig)})
    if unknown:
        raise ValueError(f"{where}: unknown model settings {unknown}: not a checkpoint of this glimpse")
    return VLMConfig(**settings)


def write_lora_base(model, ckpt, out_dir, extra_config, master):
    """The folder of the frozen weights under LoRA adapters (a LoRA checkpoint holds only what trains and
    names it): the checkpoint the run started from, or (a new model, or a checkpoint that keep_last would
    delete) out_dir/base, written once by rank 0, under a temporary name as checkpoints are."""
    start = os.path.abspath(ckpt) if ckpt else None
    if start and os.path.dirname(start) != os.path.abspath(out_dir):
        return start
    base = os.path.abspath(os.path.join(out_dir, "base"))
    if master:
        shutil.rmtree(base + ".tmp", ignore_errors=True)
        save(model, base + ".tmp", extra_config)
        shutil.rmtree(base, ignore_errors=True)
        os.replace(base + ".tmp", base)
    return base


def save_checkpoint(out_dir, state, model, vlm, optimizer, tokenizer, extra_config, keep_last, stage1_names=None,
                    group=None):
    """out_dir/ckpt-<step>/: the weights as one safetensors file (gathered from the shards under FSDP), the
    optimizer state as torch.distributed.checkpoint shards (each process writes its own; a resume on
    another number of processes reshards them), the step, data position and every process's RNG; with
    stage1_names (the names of what trained), those weights alone too, as trainable.safetensors. Then all but
    the keep_last newest are removed (None: none), never this one. Every process takes part: model is the
    trained module (DDP- or FSDP-wrapped), vlm the VLM in it; group is where the others wait for rank 0's
    writing. Returns the folder."""
    ddp = dist.is_initialized()
    master = not ddp or dist.get_rank() == 0
    path = os.path.join(out_dir, f"ckpt-{state['iter']:07d}")
    tmp = path + ".tmp"
    if master:
        shutil.rmtree(tmp, ignore_errors=True)
    if ddp:
        dist.barrier()
    dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=os.path.join(tmp, "optimizer"),
             no_dist=not ddp)
    # on rank 0, on the CPU: the whole model, or with LoRA what trains (its base is already on disk)
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                  ignore_frozen_params=lora.has_lora(vlm)))
    rng = {"cpu": torch.get_rng_state().tolist(),
           "cuda": torch.cuda.get_rng_state().tolist() if torch.cuda.is_initialized() else None}
    rngs = [None] * dist.get_world_size() if ddp else [rng]
    if ddp:
        dist.all_gather_object(rngs, rng)
    if master:
        save(vlm, tmp, extra_config, weights)
        if stage1_names is not None and not lora.has_lora(vlm):  # LLaVA's mm_projector.bin, in safetensors
            stage1 = {k: v.contiguous() for k, v in weights.items() if k in stage1_names}
            save_file(stage1, os.path.join(tmp, "trainable.safetensors"))
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump({**state, "rng": rngs}, f)
        write_manifest(tmp)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
        for old in checkpoints(out_dir)[:-keep_last] if keep_last else []:
            if old != path:  # higher steps may be another run's, in the same out_dir
                shutil.rmtree(old)
    if ddp:
        dist.barrier(group)
    return path


def write_manifest(path):
    """complete.json, written last: every file of the checkpoint with its size and CRC-32 (damage reads them)."""
    files = {}
    for root, _, names in os.walk(path):
        for n in sorted(names):
            f = os.path.join(root, n)
            files[os.path.relpath(f, path)] = [os.path.getsize(f), file_crc(f)]
    with open(os.path.join(path, "complete.json"), "w") as f:
        json.dump({"files": files}, f, indent=1)


def remove_unfinished(out_dir):
    """The .tmp folders of saves that were cut short (train.py's rank 0 at the start, holding out_dir's lock).
    One that is whole, cut short only while it took the place of the folder before it, takes that place."""
    for n in os.listdir(out_dir) if os.path.isdir(out_dir) else []:
        tmp, final = os.path.join(out_dir, n), os.path.join(out_dir, n[:-4])
        if n.endswith(".tmp") and STEP.fullmatch(n[:-4]) and os.path.exists(os.path.join(tmp, "complete.json")) \
                and damage(tmp) is None and (not os.path.exists(final) or damage(final, checksums=False)):
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        elif n.endswith(".tmp") and (STEP.fullmatch(n[:-4]) or n == "base.tmp"):
            shutil.rmtree(tmp, ignore_errors=True)


def lock(out_dir):
    """One run per out_dir: out_dir/lock names the host and process of the run that holds it, from its start to
    its end (unlock, or at exit). A lock whose process is gone, on this host, is taken over; otherwise the
    second run stops here, naming the first."""
    os.makedirs(out_dir, exist_ok=True)
    path, me = os.path.join(out_dir, "lock"), {"host": socket.gethostname(), "pid": os.getpid()}
    for attempt in range(100):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            try:
                with open(path) as f:
                    other = json.load(f)
            except (OSError, ValueError):
                other = None
            if not isinstance(other, dict) and attempt < 50:  # being written this instant, or removed: look again
                time.sleep(0.1)
                continue
            other = other if isinstance(other, dict) else {"host": me["host"], "pid": None}  # never written
            # a run that died without unlocking (this very pid: before a restart of the machine or container)
            pid = other.get("pid")
            if other.get("host") == me["host"] and (pid is None or pid == me["pid"] or not alive(pid)):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
                continue
            raise RuntimeError(f"{out_dir} is in use by another run: process {pid} on {other.get('host')} holds "
                               f"{path}. Give this run another out_dir, or, if that run is gone, delete the lock")
    else:
        raise RuntimeError(f"{path}: cannot take the lock (another run keeps taking it)")
    with os.fdopen(fd, "w") as f:
        json.dump(me, f)
    atexit.register(unlock, out_dir)


def unlock(out_dir):
    path = os.path.join(out_dir, "lock")
    try:
        with open(path) as f:
            mine = json.load(f) == {"host": socket.gethostname(), "pid": os.getpid()}
    except (OSError, ValueError):
        return
    if mine:
        os.remove(path)


def alive(pid):
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError):
        return True  # someone else's process, or a lock we cannot read: taken as in use
    return True


def load_train_state(ckpt, model, optimizer):
    """Resume: AdamW's moments from the checkpoint's shards, resharded to this run's processes (its settings,
    the lr and decay of each group, stay this run's), this process's RNG, and the step and data position,
    returned. The RNG is each process's of the run that saved: exact on as many processes, else rank % saved."""
    ddp = dist.is_initialized()
    settings = [{k: g[k] for k in ("base_lr", "weight_decay", "betas")} for g in optimizer.param_groups]
    optim_state = get_optimizer_state_dict(model, optimizer)  # the layout to fill (it makes AdamW's state exist)
    try:
        dcp.load({"optimizer": optim_state}, checkpoint_id=os.path.join(ckpt, "optimizer"), no_dist=not ddp)
        with open(os.path.join(ckpt, "state.json")) as f:
            state = json.load(f)
    except Exception as e:
        raise RuntimeError(f"{ckpt}: cannot resume from it ({type(e).__name__}: {e})") from e
    set_optimizer_state_dict(model, optimizer, optim_state)
    for g, mine in zip(optimizer.param_groups, settings):
        g.update(mine)
    rngs = state.pop("rng")
    rng = rngs[(dist.get_rank() if ddp else 0) % len(rngs)]
    torch.set_rng_state(torch.tensor(rng["cpu"], dtype=torch.uint8))
    if torch.cuda.is_initialized() and rng.get("cuda"):
        torch.cuda.set_rng_state(torch.tensor(rng["cuda"], dtype=torch.uint8))
    return state
