"""
Records -> validated -> tokenized -> memory-mapped shards -> samples -> batches (DESIGN.md's batch contract).

Preprocess once, then train from the shards:

    python data.py --data_path=llava_v1_5_mix665k.json --image_folder=data/llava --out=data/mix665k \
        --tokenizer=lmsys/vicuna-7b-v1.5 --version=v1 --num_image_tokens=576 --model_max_length=2048
    python train.py config/finetune.py --data_path=data/mix665k

train.py does the same by itself when data_path names JSON files (into out_dir/data/), and reuses the
shards while the files and settings are unchanged. A record is LLaVA's, {"id", "image": file or [files],
"conversations": [{"from": "human" | "gpt" | "system", "value": str}]}, or ShareGPT's, {"messages":
[{"role": "user" | "assistant" | "system", "content": str}]}; a record without "image" is text-only. A
record that breaks a rule is skipped, counted and listed with its reason in skipped.jsonl (strict=True
makes the first one an error). The shards hold no Python objects, only numpy arrays that every DataLoader
worker maps from disk, so a worker's memory does not grow with the number of records (LLaVA keeps the
whole JSON in every worker).

Batches: an epoch is a seeded order of all records (each source replicated by its data_multiple), cut
into global batches; a global batch is cut into micro-batches that the ranks take in turn, so one process
with N accumulation steps and N processes with one see the same records in each step, and every record
is seen exactly once per epoch whatever the number of ranks.
"""
import hashlib
import json
import multiprocessing
import os
import shutil
import sys

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from conversation import IGNORE_INDEX, IMAGE_TOKEN, bos_ids, get_template, tokenize

FORMAT = 1  # bump when the shard layout changes: older shards are then rebuilt or refused
ROLES = {"human": "human", "gpt": "gpt", "system": "system", "user": "human", "assistant": "gpt"}


class Skip(Exception):
    """A record that breaks a rule: skipped and listed with its reason (an error with strict=True). A reason
    reads 'kind: details'; the summary counts skips by kind."""


def split_list(values):
    """'a,b' or ['a', 'b'] or a single value -> a list (of strings, or of the values given)."""
    if isinstance(values, str):
        return [v for v in values.split(",") if v]
    return list(values) if isinstance(values, (list, tuple)) else [values]


def per_source(values, n, what):
    """One value for all sources, or one per source."""
    values = split_list(values) or [""]
    if len(values) == 1:
        values = values * n
    if len(values) != n:
        raise ValueError(f"{n} data files but {len(values)} {what}: give one per file, or one for all")
    return values


def read_source(path):
    """-> [(where, record or Skip)]: a JSON list ('file:index', from 0), or JSONL ('file:line', from 1),
    where a broken line is a skip of its own."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".jsonl"):
        out = []
        for i, line in enumerate(text.splitlines()):
            if line.strip():
                try:
                    out.append((f"{path}:{i + 1}", json.loads(line)))
                except json.JSONDecodeError as e:
                    out.append((f"{path}:{i + 1}", Skip(f"bad JSON line: {e}")))
        return out
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of records")
    return [(f"{path}:{i}", r) for i, r in enumerate(records)]


def normalize(record):
    """A LLaVA or ShareGPT record -> (LLaVA messages, [image file names]), or Skip."""
    if not isinstance(record, dict):
        raise Skip(f"not a record: a JSON {type(record).__name__}, not an object")
    if "conversations" in record:
        messages, role_key, value_key = record["conversations"], "from", "value"
    elif "messages" in record:
        messages, role_key, value_key = record["messages"], "role", "content"
    else:
        raise Skip("no conversation: neither 'conversations' (LLaVA) nor 'messages' (ShareGPT)")
    if not isinstance(messages, list) or not messages:
        raise Skip("empty conversation")
    out = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict):
            raise Skip(f"message not an object: message {j} is a {type(m).__name__}")
        if m.get(role_key) not in ROLES:
            raise Skip(f"unknown role: message {j} is from {m.get(role_key)!r}")
        if not isinstance(m.get(value_key), str):
            raise Skip(f"text not a string: message {j} has a {type(m.get(value_key)).__name__} {value_key}")
        out.append({"from": ROLES[m[role_key]], "value": m[value_key]})
    images = record.get("image", record.get("images"))
    images = [] if images is None else [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(i, str) and i for i in images):
        raise Skip(f"bad image field: 'image' must be a file name or a list of them, not {images!r}")
    return out, images


def check_image(path):
    """Open and decode the image (at a reduced scale where the format allows): a missing, empty, unreadable
    or truncated file is found here, not in the middle of training."""
    if not os.path.isfile(path):
        raise Skip(f"missing image: {path}")
    if os.path.getsize(path) == 0:
        raise Skip(f"empty image file: {path}")
    try:
        with Image.open(path) as img:
            img.draft("RGB", (64, 64))  # JPEG: decode at 1/8 scale; truncation still shows
            img.load()
    except Exception as e:
        raise Skip(f"unreadable image: {path}: {e}") from e
    if min(img.size) == 0:
        raise Skip(f"zero-size image: {path} is {img.size[0]}x{img.size[1]}")


def check_boxes(record):
    """Ferret's GRIT records carry pixel boxes per turn: each must lie inside image_w x image_h."""
    boxes = record.get("box_x1y1x2y2")
    if boxes is None:
        return
    w, h = record.get("image_w"), record.get("image_h")
    if not (isinstance(w, (int, float)) and isinstance(h, (int, float)) and w > 0 and h > 0):
        raise Skip("bad box: boxes given without a positive image_w and image_h")
    for turn in boxes:
        for box in turn or []:
            if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
                raise Skip(f"bad box: {box!r} is not [x1, y1, x2, y2]")
            x1, y1, x2, y2 = box
            if not (0 <= x1 <= x2 <= w and 0 <= y1 <= y2 <= h):
                raise Skip(f"box outside the image: {box} in {w}x{h}")


def truncate(ids, trained, max_len, image_id, num_image_tokens):
    """Cut compact ids (one image id per image) to max_len tokens counted with num_image_tokens per image,
    never through an image's block. Skip if an image or every trained token would be lost."""
    sizes = np.where(ids == image_id, num_image_tokens, 1)
    ends = np.cumsum(sizes)
    keep = int(np.searchsorted(ends, max_len, side="right"))  # the tokens that end within max_len
    if keep < len(ids):
        if (ids[keep:] == image_id).any():
            raise Skip(f"too long: over model_max_length={max_len}, an image would be cut")
        ids, trained = ids[:keep], trained[:keep]
    if not trained.any():
        raise Skip(f"too long: over model_max_length={max_len}, nothing left to train")
    return ids, trained


def prepare(record, folder, template, tokenizer, num_image_tokens, max_len):
    """One record -> (compact ids int32, trained uint8, image paths), or Skip with the reason."""
    messages, images = normalize(record)
    if not any(m["from"] == "gpt" for m in messages):
        raise Skip("no assistant reply")
    n_tags = sum(m["value"].count(IMAGE_TOKEN) for m in messages)
    if n_tags != len(images):
        raise Skip(f"image tags: {n_tags} <image> tags for {len(images)} images")
    paths = [os.path.join(folder, i) for i in images]
    for p in paths:
        check_image(p)
    check_boxes(record)
    try:
        ids, labels = tokenize(template, messages, tokenizer, 1)
    except ValueError as e:  # turns out of order, an empty message, <image> in a reply, ...
        raise Skip(f"bad conversation: {e}") from e
    ids = np.asarray(ids, np.int32)
    ids, trained = truncate(ids, np.asarray(labels) != IGNORE_INDEX, max_len,
                            tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), num_image_tokens)
    return ids, trained.astype(np.uint8), paths


# preprocessing: sources -> shards --------------------------------------------------------------------------

def tokenizer_hash(tokenizer):
    """Same vocabulary, merges, normalization, specials and chat template -> same hash: the shards' ids
    mean the same tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)  # a fast tokenizer's whole definition, as JSON
    h = hashlib.sha1(backend.to_str().encode() if backend else json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps([str(tokenizer.bos_token), str(tokenizer.eos_token), tokenizer.chat_template,
                         bos_ids(tokenizer)]).encode())
    return h.hexdigest()[:16]


def settings(data_path, image_folder, tokenizer, version, num_image_tokens, model_max_length):
    """What shards depend on: the sources (their sizes and times), the tokenizer, the templates, the image
    token count and the length limit. Shards whose settings differ are made again (or refused by train.py)."""
    paths = split_list(data_path)
    folders = per_source(image_folder, len(paths), "image folders")
    sources = [{"path": os.path.abspath(p), "image_folder": os.path.abspath(f), "bytes": os.path.getsize(p),
                "mtime_ns": os.stat(p).st_mtime_ns} for p, f in zip(paths, folders)]
    templates = per_source(version, len(paths), "templates")
    return {"sources": sources, **model_settings(tokenizer, templates, num_image_tokens, model_max_length)}


def model_settings(tokenizer, templates, num_image_tokens, model_max_length):
    """The settings that tie shards to a model: train.py checks these on shards it did not make."""
    return {"format": FORMAT, "templates": templates, "template_definitions": [get_template(t) for t in templates],
            "tokenizer": tokenizer_hash(tokenizer), "vocab_size": len(tokenizer),
            "image_token_id": tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), "num_image_tokens": num_image_tokens,
            "model_max_length": model_max_length}


def differences(have, want):
    """The settings that differ, in words."""
    out = []
    for k in want:
        if k == "sources" and len(have.get(k, [])) == len(want[k]):
            for i, (a, b) in enumerate(zip(have[k], want[k])):
                out += [f"source {i} {f}: {a.get(f)!r} in the shards, {b[f]!r} now" for f in b if a.get(f) != b[f]]
        elif have.get(k) != json.loads(json.dumps(want[k])):  # as the manifest stores it (tuples become lists)
            out.append(f"{k}: {have.get(k)!r} in the shards, {want[k]!r} now")
    return out


def read_manifest(out):
    path = os.path.join(out, "manifest.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


_worker = {}  # what preprocess gives each worker process: the tokenizer and the sources' folders and templates


def prepare_item(item):
    """(source, where, record) -> (source, where, id, (ids, trained, paths) or Skip, content hash)."""
    source, where, record = item
    rid = record.get("id") if isinstance(record, dict) else None
    digest = hashlib.sha1(json.dumps(record, sort_keys=True, default=str).encode()).digest()
    try:
        if isinstance(record, Skip):
            raise record
        w = _worker
        result = prepare(record, w["folders"][source], w["templates"][source], w["tokenizer"], w["num_image_tokens"],
                         w["max_len"])
    except Skip as e:
        result = e
    return source, where, rid, result, digest


def preprocess(data_path, image_folder, out, tokenizer, version, num_image_tokens, model_max_length=2048,
               strict=False, num_proc=None, quiet=False):
    """Validate and tokenize the records of every source, on num_proc processes (all cores by default), and
    write shards to `out`; nothing to do if `out` holds shards of the same sources and settings. Returns
    the manifest. The new shards replace old ones only once they are complete."""
    want = settings(data_path, image_folder, tokenizer, version, num_image_tokens, model_max_length)
    have = read_manifest(out)
    if have is not None and not differences(have, want):
        if strict and have["skipped"]:
            raise ValueError(f"{out}: strict=True, but these shards skipped {have['skipped']} records "
                             f"(listed in {out}/skipped.jsonl)")
        return have
    if have is None and os.path.isdir(out) and os.listdir(out):
        raise ValueError(f"{out} is a folder that holds no shards: not replacing it; give another --out")
    _worker.update(tokenizer=tokenizer, folders=[s["image_folder"] for s in want["sources"]], templates=want["templates"],
                   num_image_tokens=num_image_tokens, max_len=model_max_length)
    items = ((i, where, record) for i, s in enumerate(want["sources"]) for where, record in read_source(s["path"]))
    num_proc = num_proc or os.cpu_count()
    pool = multiprocessing.get_context("fork").Pool(num_proc) if num_proc > 1 else None  # workers inherit _worker
    results = pool.imap(prepare_item, items, chunksize=64) if pool else map(prepare_item, items)
    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # what a run that was cut short left
    os.makedirs(tmp)
    ids_file, trained_file = open(os.path.join(tmp, "ids.bin"), "wb"), open(os.path.join(tmp, "trained.bin"), "wb")
    offsets, lengths, sources, image_index, images, skipped, seen = [0], [], [], [0], [], [], {}
    try:
        for source, where, rid, r, digest in tqdm(results, unit="rec", desc=f"preprocessing -> {out}", file=sys.stderr,
                                                  disable=True if quiet else None):  # None: on a terminal only
            # the same id with the same content is a copy; the same id alone is not (LLaVA's ids are image ids)
            if not isinstance(r, Skip) and (source, digest) in seen:
                r = Skip(f"duplicate record: the same id {rid!r} and content as {seen[source, digest]}")
            if isinstance(r, Skip):
                if strict:
                    raise ValueError(f"{where} (id {rid!r}): {r}")
                skipped.append({"where": where, "id": rid, "reason": str(r)})
                continue
            seen[source, digest] = where
            ids, trained, paths = r
            ids_file.write(ids.tobytes())
            trained_file.write(trained.tobytes())
            offsets.append(offsets[-1] + len(ids))
            lengths.append(len(ids) + len(paths) * (num_image_tokens - 1))
            sources.append(source)
            images += paths
            image_index.append(len(images))
    finally:
        if pool:
            pool.terminate()
        ids_file.close()
        trained_file.close()
    kinds = {}
    for s in skipped:
        kind = s["reason"].split(":")[0]
        kinds[kind] = kinds.get(kind, 0) + 1
    if not quiet or not lengths:
        print(f"{out}: {len(lengths)} records, {len(skipped)} skipped" + "".join(
            f"\n  {n} x {kind}" for kind, n in sorted(kinds.items(), key=lambda x: -x[1])), file=sys.stderr)
    if not lengths:
        with open(tmp + "/skipped.jsonl", "w") as f:
            f.writelines(json.dumps(s) + "\n" for s in skipped)
        raise ValueError(f"{data_path}: no usable records; the reasons are in {tmp}/skipped.jsonl")
    np.save(os.path.join(tmp, "offsets.npy"), np.asarray(offsets, np.int64))
    np.save(os.path.join(tmp, "lengths.npy"), np.asarray(lengths, np.int32))
    np.save(os.path.join(tmp, "sources.npy"), np.asarray(sources, np.int16))
    np.save(os.path.join(tmp, "image_index.npy"), np.asarray(image_index, np.int64))
    np.save(os.path.join(tmp, "images.npy"), np.asarray([p.encode() for p in images], dtype=bytes))
    with open(os.path.join(tmp, "skipped.jsonl"), "w") as f:
        f.writelines(json.dumps(s) + "\n" for s in skipped)
    counts = np.bincount(np.asarray(sources, np.int64), minlength=len(want["sources"])).tolist()
    manifest = {**want, "records": len(lengths), "records_per_source": counts, "skipped": len(skipped),
                "skipped_by_kind": kinds}
    with open(os.path.join(tmp, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    shutil.rmtree(out, ignore_errors=True)  # old shards of other settings (a folder of anything else was refused)
    os.replace(tmp, out)
    return json.loads(json.dumps(manifest))


# training: shards -> samples -> batches --------------------------------------------------------------------

def load_image(path, mode, size, mean, std):
    """A file -> normalized [3, size, size] float tensor. Modes: 'pad' (LLaVA: pad to a square with
    the mean color, then resize), 'square_nocrop' (Ferret: resize, aspect not kept), 'crop' (resize the
    short side, then center crop)."""
    try:
        img = Image.open(path).convert("RGB")
    except Exception as e:  # deleted or damaged after preprocessing: an error naming it, never a blank image
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


class ShardDataset(torch.utils.data.Dataset):
    """Samples {input_ids, labels, pixel_values [n_images, 3, H, W]} from the shards in `path`. Given the
    model's settings (tokenizer, version, num_image_tokens, model_max_length), shards made with others are
    refused, naming what differs: their ids would mean other tokens, or their lengths other limits. Index
    ~i (negative) gives record i with nothing trained: a stand-in for an empty micro-batch."""

    def __init__(self, path, image_size, image_mean, image_std, image_aspect_ratio="pad", tokenizer=None,
                 version=None, num_image_tokens=None, model_max_length=None):
        self.manifest = read_manifest(path)
        if self.manifest is None:
            raise FileNotFoundError(f"{path}: no manifest.json (make shards with: python data.py --out={path} ...)")
        if tokenizer is not None:
            templates = per_source(version, len(self.manifest["sources"]), "templates")
            diff = differences(self.manifest, model_settings(tokenizer, templates, num_image_tokens, model_max_length))
            if diff:
                raise ValueError(f"{path}: these shards were made with other settings: " + "; ".join(diff))
        self.path, self.image_args = path, (image_aspect_ratio, image_size, image_mean, image_std)
        self.num_image_tokens, self.image_id = self.manifest["num_image_tokens"], self.manifest["image_token_id"]
        self.lengths = np.load(os.path.join(path, "lengths.npy"), mmap_mode="r")
        self.sources = np.load(os.path.join(path, "sources.npy"), mmap_mode="r")
        self.image_index = np.load(os.path.join(path, "image_index.npy"), mmap_mode="r")
        self.has_image = np.diff(self.image_index) > 0
        self.n_sources, self.skipped = len(self.manifest["sources"]), self.manifest["skipped"]
        self.arrays = None  # the big ones are mapped on first use, in the process that reads them

    def __len__(self):
        return len(self.lengths)

    def open(self):
        p = self.path
        self.arrays = (np.memmap(os.path.join(p, "ids.bin"), np.int32, "r"), np.memmap(os.path.join(p, "trained.bin"), np.uint8, "r"),
                       np.load(os.path.join(p, "offsets.npy"), mmap_mode="r"), np.load(os.path.join(p, "images.npy"), mmap_mode="r"))

    def __getitem__(self, i):
        if self.arrays is None:
            self.open()
        ids_all, trained_all, offsets, images = self.arrays
        j = ~i if i < 0 else i
        ids, trained = ids_all[offsets[j]:offsets[j + 1]], trained_all[offsets[j]:offsets[j + 1]].astype(bool)
        if i < 0:
            trained = np.zeros_like(trained)
        repeat = np.where(ids == self.image_id, self.num_image_tokens, 1)  # each image id -> its block
        ids, trained = np.repeat(ids, repeat), np.repeat(trained, repeat)
        input_ids = torch.from_numpy(ids.astype(np.int64))
        labels = torch.where(torch.from_numpy(trained), input_ids, IGNORE_INDEX)
        paths = [images[k].decode() for k in range(self.image_index[j], self.image_index[j + 1])]
        size = self.image_args[1]
        pixels = torch.stack([load_image(p, *self.image_args) for p in paths]) if paths else torch.zeros(0, 3, size, size)
        return {"input_ids": input_ids, "labels": labels, "pixel_values": pixels}


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


def epoch_order(sources, seed, epoch, multiples=None, curriculum=False):
    """The records of an epoch, in order: source s's records multiples[s] times (a fraction takes a
    seeded subset: 1.5 is every record once and half of them twice; 0 leaves the source out), all shuffled
    together, or with curriculum=True the sources one after another, each shuffled (captions first, then
    instructions: LLaVA's two stages in one run). multiples: one number per source (None: once each)."""
    rng = np.random.default_rng([seed, epoch])
    sources = np.asarray(sources)
    multiples = [1] * (int(sources.max()) + 1 if len(sources) else 0) if multiples is None else multiples
    blocks = []
    for s, m in enumerate(map(float, multiples)):
        idx = np.flatnonzero(sources == s)
        extra = rng.choice(idx, round((m % 1) * len(idx)), replace=False)
        blocks.append(rng.permutation(np.concatenate([np.tile(idx, int(m)), extra]).astype(np.int64)))
    return np.concatenate(blocks) if curriculum else rng.permutation(np.concatenate(blocks or [np.zeros(0, np.int64)]))


def global_batches(order, size, lengths=None, has_image=None, seed=0, epoch=0):
    """An epoch's order -> global batches of `size` records (the last one may be smaller). With lengths,
    LLaVA's group_by_modality_length: image and text-only records apart, and within each run of `size`
    sorted by length (less padding); the full batches are shuffled, the remainders of both kinds go last.
    One kind may be absent."""
    if lengths is None:
        return [order[i:i + size] for i in range(0, len(order), size)]
    rng = np.random.default_rng([seed, epoch, 1])
    full, rest = [], []
    for kind in (True, False):
        part = order[np.asarray(has_image)[order] == kind]
        chunks = [part[i:i + size] for i in range(0, len(part), size)]
        for c in chunks:
            c = c[np.argsort(-np.asarray(lengths)[c], kind="stable")]
            (full if len(c) == size else rest).append(c)
    full = [full[k] for k in rng.permutation(len(full))]
    rest = np.concatenate(rest) if rest else np.zeros(0, np.int64)
    return full + [rest[i:i + size] for i in range(0, len(rest), size)]


def epoch_batches(sources, global_batch, seed, epoch, multiples=None, curriculum=False, lengths=None, has_image=None):
    """The global batches of an epoch (epoch_order, then global_batches; with curriculum, each source's
    records are batched on their own, so no batch mixes two stages)."""
    order = epoch_order(sources, seed, epoch, multiples, curriculum)
    if not curriculum:
        return global_batches(order, global_batch, lengths, has_image, seed, epoch)
    sources = np.asarray(sources)
    return [b for s in dict.fromkeys(sources[order].tolist())
            for b in global_batches(order[sources[order] == s], global_batch, lengths, has_image, seed, epoch)]


def rank_batches(batches, micro_batch, accum, rank, world, start_step=0):
    """This rank's micro-batches (lists of indices), accum per step, from step start_step on. Global batch
    s is cut into accum * world near-equal contiguous micro-batches and the k-th goes to rank k % world; so
    a full batch gives micro_batch records each. Where a small last batch leaves a micro-batch empty, it is
    [~first record]: that record with nothing trained, so that every rank still runs (and, under DDP,
    all-reduces) each micro-step, while the loss and the gradients stay those of the real records."""
    K = accum * world
    out = []
    for chunk in batches[start_step:]:
        chunk = [int(i) for i in chunk]
        sizes = [len(chunk) // K + (k < len(chunk) % K) for k in range(K)]
        starts = np.cumsum([0] + sizes)
        micro = [chunk[starts[k]:starts[k + 1]] or [~chunk[0]] for k in range(K)]
        out += micro[rank::world]
    return out


def steps_per_epoch(n, global_batch):
    return -(-n // global_batch)  # the last global batch may be smaller: every record, every epoch


if __name__ == "__main__":
    import configurator
    from transformers import AutoTokenizer
    args = configurator.configure(dict(data_path="", image_folder="", out="", tokenizer="", version="vicuna_v1",
                                       num_image_tokens=576, model_max_length=2048, strict=False, num_proc=0), sys.argv[1:])
    if not (args["data_path"] and args["out"] and args["tokenizer"]):
        sys.exit("usage: python data.py --data_path=a.json,b.jsonl --image_folder=dirA,dirB --out=DIR --tokenizer=PATH "
                 "[--version=vicuna_v1] [--num_image_tokens=576] [--model_max_length=2048] [--strict=True]")
    tok = AutoTokenizer.from_pretrained(args["tokenizer"])
    if IMAGE_TOKEN not in tok.get_vocab():  # as train.py adds it
        tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    preprocess(args["data_path"], args["image_folder"], args["out"], tok, args["version"], args["num_image_tokens"],
               args["model_max_length"], args["strict"], args["num_proc"] or None)
