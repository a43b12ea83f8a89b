"""
Records -> validated -> tokenized -> samples -> batches (the batch contract of DESIGN.md).

A record is LLaVA's: {"id", "image" (optional, relative to its image folder), "conversations":
[{"from": "human" | "gpt" | "system", "value": str}, ...]}. Records are checked and tokenized once,
when the dataset is built; images are read and transformed per sample (in DataLoader workers).

Batches: every optimizer step takes one global batch of records from a seeded permutation of the
epoch; it is cut into micro-batches that the ranks take in turn, so one process with N accumulation
steps and N processes with one see the same records in each step.
"""
import json
import os

import numpy as np
import torch
from PIL import Image

from conversation import IGNORE_INDEX, IMAGE_TOKEN, tokenize

ROLES = ("human", "gpt", "system")


def split_paths(paths):
    """'a.json,b.json' or ['a.json', 'b.json'] -> list."""
    if not paths:
        return []
    return [p for p in (paths.split(",") if isinstance(paths, str) else paths) if p]


def per_file(values, paths, what):
    """One value for all files, or one per file."""
    values = split_paths(values) or [""]
    if len(values) == 1:
        values = values * len(paths)
    if len(values) != len(paths):
        raise ValueError(f"{len(paths)} data files but {len(values)} {what}: give one per file, or one for all")
    return values


def read_records(data_path, image_folder, template):
    """-> [(record, image folder, chat template, 'file:index')] from one or more JSON (list) or JSONL
    files; each file has its own image folder and template (or one for all)."""
    paths = split_paths(data_path)
    out = []
    for path, folder, tpl in zip(paths, per_file(image_folder, paths, "image folders"), per_file(template, paths, "templates")):
        with open(path) as f:
            text = f.read()
        try:
            records = [json.loads(line) for line in text.splitlines() if line.strip()] if path.endswith(".jsonl") else json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a JSON list of records")
        out += [(r, folder, tpl, f"{path}:{i}") for i, r in enumerate(records)]
    return out


def validate(record, folder, where):
    """Raise a ValueError naming the record and the problem; return the image path or None."""
    where = f"{where} (id {record.get('id')!r})" if isinstance(record, dict) else where
    if not isinstance(record, dict) or not isinstance(record.get("conversations"), list) or not record["conversations"]:
        raise ValueError(f"{where}: a record needs a non-empty 'conversations' list")
    n_tags = 0
    for j, m in enumerate(record["conversations"]):
        if not isinstance(m, dict) or m.get("from") not in ROLES or not isinstance(m.get("value"), str):
            raise ValueError(f"{where}: message {j} must be {{'from': one of {ROLES}, 'value': str}}, got {m!r}")
        n_tags += m["value"].count(IMAGE_TOKEN)
    if not any(m["from"] == "gpt" for m in record["conversations"]):
        raise ValueError(f"{where}: no assistant ('gpt') reply to train on")
    image = record.get("image")
    if image is None:
        if n_tags:
            raise ValueError(f"{where}: {n_tags} <image> tags but no 'image'")
        return None
    if not isinstance(image, str):
        raise ValueError(f"{where}: 'image' must be a file name, got {image!r}")
    if n_tags != 1:
        raise ValueError(f"{where}: one image needs exactly one <image> tag, found {n_tags}")
    path = os.path.join(folder, image)
    if not os.path.isfile(path):
        raise ValueError(f"{where}: image file {path} does not exist")
    return path


def truncate(ids, labels, max_len, image_token_id):
    """Cut to max_len tokens, but never through an image block. None if no trained token, or no whole
    image block, survives."""
    n_image = ids.count(image_token_id)
    if len(ids) > max_len:
        cut = max_len
        while cut > 0 and ids[cut - 1] == image_token_id and ids[cut] == image_token_id:  # drop a cut block whole
            cut -= 1
        ids, labels = ids[:cut], labels[:cut]
    if ids.count(image_token_id) != n_image or all(l == IGNORE_INDEX for l in labels):
        return None
    return ids, labels


def load_image(path, mode, size, mean, std):
    """A file -> normalized [3, size, size] float tensor. Modes: 'pad' (LLaVA: pad to a square with
    the mean color, then resize), 'square_nocrop' (Ferret: resize, aspect not kept), 'crop' (resize the
    short side, then center crop)."""
    try:
        img = Image.open(path).convert("RGB")
    except Exception as e:
        raise RuntimeError(f"cannot read image {path}: {e}") from e
    w, h = img.size
    if mode == "pad" and w != h:
        side = max(w, h)
        square = Image.new("RGB", (side, side), tuple(int(255 * m) for m in mean))
        square.paste(img, ((side - w) // 2, (side - h) // 2))
        img = square
    elif mode == "crop":
        s = size / min(w, h)
        img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
        left, top = (img.width - size) // 2, (img.height - size) // 2
        img = img.crop((left, top, left + size, top + size))
    elif mode not in ("pad", "square_nocrop"):
        raise ValueError(f"image_aspect_ratio={mode!r}: use 'pad', 'square_nocrop' or 'crop'")
    if img.size != (size, size):
        img = img.resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


class SupervisedDataset(torch.utils.data.Dataset):
    """Tokenized records; a sample is {input_ids, labels, pixel_values [0 or 1, 3, H, W]}."""

    def __init__(self, data_path, image_folder, tokenizer, template, num_image_tokens, image_size,
                 image_mean, image_std, image_aspect_ratio="pad", model_max_length=2048):
        self.image_args = (image_aspect_ratio, image_size, image_mean, image_std)
        image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.samples, self.skipped, self.file_sizes = [], {}, []  # file_sizes: records kept per data file
        for record, folder, tpl, where in read_records(data_path, image_folder, template):
            if where.endswith(":0"):  # the first record of the next file
                self.file_sizes.append(0)
            image = validate(record, folder, where)
            try:
                ids, labels = tokenize(tpl, record["conversations"], tokenizer, num_image_tokens)
            except ValueError as e:
                raise ValueError(f"{where} (id {record.get('id')!r}): {e}") from e
            kept = truncate(ids, labels, model_max_length, image_token_id)
            if kept is None:  # LLaVA drops these too, but silently
                self.skipped[where] = f"longer than model_max_length={model_max_length} with nothing left to train"
                continue
            self.samples.append((np.array(kept[0], np.int32), np.array(kept[1], np.int32), image))
            self.file_sizes[-1] += 1
        if not self.samples:
            raise ValueError(f"{data_path}: no usable records")

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        ids, labels, image = self.samples[i]
        pixels = load_image(image, *self.image_args)[None] if image else torch.zeros(0, 3, self.image_args[1], self.image_args[1])
        return {"input_ids": torch.from_numpy(ids).long(), "labels": torch.from_numpy(labels).long(), "pixel_values": pixels}


def collate(samples, pad_token_id):
    """Right-pad to the longest sample; images concatenated in the order their tokens appear."""
    T = max(len(s["input_ids"]) for s in samples)
    input_ids = torch.full((len(samples), T), pad_token_id, dtype=torch.long)
    labels = torch.full((len(samples), T), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), T), dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        input_ids[i, :n], labels[i, :n], attention_mask[i, :n] = s["input_ids"], s["labels"], 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
            "pixel_values": torch.cat([s["pixel_values"] for s in samples])}


def steps_per_epoch(n, global_batch):
    return n // global_batch  # the last incomplete global batch is dropped


def epoch_order(sizes, seed, epoch, curriculum=False):
    """The order of all records in an epoch: a seeded shuffle of everything, or with curriculum=True
    the data files one after another, each shuffled (e.g. captions first, then instructions: LLaVA's
    two stages in one run)."""
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    if not curriculum:
        return torch.randperm(sum(sizes), generator=g).tolist()
    starts = np.cumsum([0] + list(sizes))
    return [int(starts[i]) + j for i, n in enumerate(sizes) for j in torch.randperm(n, generator=g).tolist()]


def rank_batches(sizes, micro_batch, accum, rank, world, seed, epoch, start_step=0, curriculum=False):
    """The micro-batches (lists of indices) this rank runs in `epoch`, from optimizer step start_step on:
    accum per step. Global batch s is order[s * B : (s + 1) * B] with B = micro_batch * accum * world;
    its k-th micro-batch goes to rank k % world. sizes: the number of records of each data file."""
    perm = epoch_order([sizes] if isinstance(sizes, int) else sizes, seed, epoch, curriculum)
    n = len(perm)
    B = micro_batch * accum * world
    out = []
    for s in range(start_step, steps_per_epoch(n, B)):
        chunk = perm[s * B:(s + 1) * B]
        out += [chunk[k * micro_batch:(k + 1) * micro_batch] for k in range(rank, accum * world, world)]
    return out
