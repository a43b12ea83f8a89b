"""
Records -> validated -> tokenized -> memory-mapped shards -> samples -> batches: LLaVA's
LazySupervisedDataset, DataCollatorForSupervisedDataset and LengthGroupedSampler, with its
preprocess_multimodal and preprocess_v1 done once, before training, by conversation.tokenize.

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

A batch is the one contract between this file and model.py: input_ids and labels [B, T] int64 (labels
-100 where nothing trains, and at each record's first token), attention_mask [B, T] (1 on the tokens, 0 on
the right padding; counted, not given to the LLM in training), pixel_values [N_img, 3, H, W], the images in
the order their blocks of image tokens appear, and for Ferret region_masks [N_reg, H, W] bool with
region_image [N_reg] (the index of each region's image), in the order of their <region_fea> tokens.
Packed (packing=True), a row holds several records, whole, and position_ids [B, T] restart at 0 for each.
Where collate knows the token ids, image_positions, region_positions and loss_positions give, as flat
indices into the B * T tokens, the image tokens, the region tokens and the tokens whose next one trains.

Batches: an epoch is a seeded order of all records (each source replicated by its data_multiple), cut
into global batches; a global batch is cut into micro-batches that the ranks take in turn, so one process
with N accumulation steps and N processes with one see the same records in each step, and every record
is seen exactly once per epoch whatever the number of ranks. Packed, a global batch's records are dealt to
the micro-batches by cost, so that the ranks' steps take about as long, and each micro-batch is packed into
as few rows, as evenly filled, as found.
"""
import functools
import hashlib
import heapq
import json
import multiprocessing
import os
import shutil
import subprocess
import sys

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import ferret  # Ferret
from conversation import (IGNORE_INDEX, IMAGE_TOKEN, REGION_TOKEN, add_tokens, bos_ids, get_template, image_order,
                          tokenize)

FORMAT = 2  # bump when the shard layout changes: older shards are then rebuilt or refused
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
    or truncated file is found here, not in the middle of training. Returns its size."""
    if not os.path.isfile(path):
        raise Skip(f"missing image: {path}")
    if os.path.getsize(path) == 0:
        raise Skip(f"empty image file: {path}")
    try:
        with Image.open(path) as img:
            size = img.size
            img.draft("RGB", (64, 64))  # JPEG: decode at 1/8 scale; truncation still shows
            img.load()
    except Exception as e:
        raise Skip(f"unreadable image: {path}: {e}") from e
    if min(size) == 0:
        raise Skip(f"zero-size image: {path} is {size[0]}x{size[1]}")
    return size


def image_size(path):
    """check_image, once per version of a file (its size and mtime): the records of one image (its caption and its
    questions, on shapes five of them) share its check."""
    try:
        st = os.stat(path)
    except OSError:
        return check_image(path)  # which says what is wrong
    return checked_size(path, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=1 << 17)
def checked_size(path, nbytes, mtime_ns):  # nbytes and mtime_ns only key the cache: a rewritten file is checked again
    return check_image(path)


def check_inside(name, path, folder):
    """An image named in a record must lie in its image folder: an absolute name, or one whose '..' climbs out,
    would read any file on the machine. Decided on the names (normpath, not realpath): a link inside the folder
    is the folder's owner's doing (a dataset linked in, as LLaVA's layouts do), and stays allowed."""
    folder, where = os.path.abspath(folder), os.path.abspath(path)  # abspath normalizes: each '..' by name
    if os.path.commonpath([folder, where]) != folder:
        raise Skip(f"image outside the folder: {name!r} is {where}, outside {folder} (allow_outside_images=True "
                   "reads it)")


# images: LLaVA's expand2square ('pad') and the other transforms ---------------------------------------------

def fit(img, mode, size, fill, resample=Image.BICUBIC):
    """The image transform, for an image and for its region masks alike: 'pad' (LLaVA's expand2square: pad
    to a square with `fill`, then resize), 'square_nocrop' (Ferret: resize, aspect not kept), 'crop' (resize the short
    side, then center crop)."""
    w, h = img.size
    if mode == "pad" and w != h:
        side = max(w, h)
        square = Image.new(img.mode, (side, side), fill)
        square.paste(img, ((side - w) // 2, (side - h) // 2))
        img = square
    elif mode == "crop":
        s = size / min(w, h)
        img = img.resize((max(size, round(w * s)), max(size, round(h * s))), resample)
        left, top = (img.width - size) // 2, (img.height - size) // 2
        img = img.crop((left, top, left + size, top + size))
    elif mode not in ("pad", "square_nocrop"):
        raise ValueError(f"image_aspect_ratio={mode!r}: use 'pad', 'square_nocrop' or 'crop'")
    return img if img.size == (size, size) else img.resize((size, size), resample)


def fit_xy(x, y, w, h, mode, size):
    """Where fit puts the point (x, y) of a w x h image: its coordinates in the size x size input."""
    if mode == "pad":
        side = max(w, h)
        return (x + (side - w) // 2) * size / side, (y + (side - h) // 2) * size / side
    if mode == "crop":
        s = size / min(w, h)
        cw, ch = max(size, round(w * s)), max(size, round(h * s))
        return x * cw / w - (cw - size) // 2, y * ch / h - (ch - size) // 2
    return x * size / w, y * size / h


def region_mask(region, frame, image_size, mode, size):  # Ferret
    """A Ferret region -> bool [size, size] at the model's input, where the image transform puts it: its
    mask over the image's own pixels (ferret.region_pixels) given the image's transform (an input pixel is in
    the region if any pixel under it is). A region that crop cuts away keeps the input pixel nearest its
    center (a point's: the point)."""
    pixels, (cx, cy) = ferret.region_pixels(region, frame, image_size)
    mask = np.asarray(fit(Image.fromarray(pixels), mode, size, 0.0, Image.BOX)) > 0  # float: a sliver still counts
    if not mask.any():  # cut away by crop
        x, y = fit_xy(cx, cy, *image_size, mode, size)
        mask[min(max(int(y), 0), size - 1), min(max(int(x), 0), size - 1)] = True
    return torch.from_numpy(mask)


# records -> tokens -----------------------------------------------------------------------------------------

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


def prepare(record, folder, template, tokenizer, num_image_tokens, max_len, regions=None, rng=None,
            allow_outside_images=False):
    """One record -> (compact ids int32, trained uint8, image paths, its regions or None), or Skip with the
    reason. regions: ferret.place_regions' settings, for GRIT records (rng draws their box-or-point choices).
    allow_outside_images: image names may lead out of the folder (an absolute path, '..')."""
    messages, images = normalize(record)
    if not any(m["from"] == "gpt" for m in messages):
        raise Skip("no assistant reply")
    n_tags = sum(m["value"].count(IMAGE_TOKEN) for m in messages)
    if n_tags != len(images):
        raise Skip(f"image tags: {n_tags} <image> tags for {len(images)} images")
    if any(REGION_TOKEN in m["value"] for m in messages):
        raise Skip(f"region token in the text: {REGION_TOKEN} comes from a <bbox_location{{i}}> placeholder and "
                   "its box")
    paths = [os.path.join(folder, i) for i in images]
    if not allow_outside_images:
        for name, p in zip(images, paths):
            check_inside(name, p, folder)
    sizes = [image_size(p) for p in paths]
    placed = None
    try:  # Ferret: a GRIT record's regions, in the text and as masks to make
        messages, placed = ferret.place(record, messages, sizes, rng, regions)
    except ferret.BadRegion as e:
        raise Skip(str(e)) from e
    try:
        ids, labels = tokenize(template, messages, tokenizer, 1)
    except ValueError as e:  # turns out of order, an empty message, <image> in a reply, ...
        raise Skip(f"bad conversation: {e}") from e
    paths = [paths[i] for i in image_order(template, messages)]  # an image the template shows twice: both blocks
    ids = np.asarray(ids, np.int32)
    ids, trained = truncate(ids, np.asarray(labels) != IGNORE_INDEX, max_len,
                            tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), num_image_tokens)
    if placed:  # Ferret: the regions whose tokens truncation kept
        placed["regions"] = placed["regions"][:int((ids == tokenizer.convert_tokens_to_ids(REGION_TOKEN)).sum())]
    return ids, trained.astype(np.uint8), paths, placed if placed and placed["regions"] else None


# preprocessing: sources -> shards --------------------------------------------------------------------------

def tokenizer_hash(tokenizer):
    """Same vocabulary, merges, normalization, specials and chat template -> same hash: the shards' ids
    mean the same tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)  # a fast tokenizer's whole definition, as JSON
    definition = backend.to_str() if backend else json.dumps(sorted(tokenizer.get_vocab().items()))
    h = hashlib.sha1(definition.encode())
    h.update(json.dumps([str(tokenizer.bos_token), str(tokenizer.eos_token), tokenizer.chat_template,
                         bos_ids(tokenizer)]).encode())
    return h.hexdigest()[:16]


def settings(data_path, image_folder, tokenizer, version, num_image_tokens, model_max_length, regions=None,
             allow_outside_images=False):
    """What shards depend on: the sources (their sizes and times), whether their images may lie outside their
    folders, the tokenizer, the templates, the image token count, the length limit, how GRIT regions become
    text. Shards whose settings differ are made again (or refused by train.py)."""
    paths = split_list(data_path)
    folders = per_source(image_folder, len(paths), "image folders")
    sources = [{"path": os.path.abspath(p), "image_folder": os.path.abspath(f), "bytes": os.path.getsize(p),
                "mtime_ns": os.stat(p).st_mtime_ns} for p, f in zip(paths, folders)]
    templates = per_source(version, len(paths), "templates")
    return {"sources": sources, "allow_outside_images": bool(allow_outside_images),
            **model_settings(tokenizer, templates, num_image_tokens, model_max_length, regions)}


def model_settings(tokenizer, templates, num_image_tokens, model_max_length, regions=None):
    """The settings that tie shards to a model: train.py checks these on shards it did not make."""
    regions = ferret.settings(regions, tokenizer)  # Ferret
    return {"format": FORMAT, "templates": templates, "template_definitions": [get_template(t) for t in templates],
            "tokenizer": tokenizer_hash(tokenizer), "vocab_size": len(tokenizer),
            "image_token_id": tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), "num_image_tokens": num_image_tokens,
            "model_max_length": model_max_length, "regions": regions}


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
    """(source, where, record) -> (source, where, id, prepare's result or Skip, content hash)."""
    source, where, record = item
    rid = record.get("id") if isinstance(record, dict) else None
    digest = hashlib.sha1(json.dumps(record, sort_keys=True, default=str).encode()).digest()
    try:
        if isinstance(record, Skip):
            raise record
        w = _worker
        rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))  # a record's own draws, the same every time
        result = prepare(record, w["folders"][source], w["templates"][source], w["tokenizer"], w["num_image_tokens"],
                         w["max_len"], w["regions"], rng, w["allow_outside_images"])
    except Skip as e:
        result = e
    return source, where, rid, result, digest


def preprocess(data_path, image_folder, out, tokenizer, version, num_image_tokens, model_max_length=2048,
               strict=False, num_proc=None, quiet=False, regions=None, allow_outside_images=False, max_skipped=0.5):
    """Validate and tokenize the records of every source, on num_proc processes (all cores by default), and
    write shards to `out`; nothing to do if `out` holds shards of the same sources and settings. Returns
    the manifest. The new shards replace old ones only once they are complete. regions: place_regions'
    settings for GRIT records, whose box-or-point choices are drawn here, once, seeded by the record's content.
    An image whose name leads out of its folder is a skip, unless allow_outside_images. A source that yields no
    record, or loses more than the share max_skipped of its records to skips (a wrong image folder, say), is
    an error with the summary."""
    want = settings(data_path, image_folder, tokenizer, version, num_image_tokens, model_max_length, regions,
                    allow_outside_images)
    have = read_manifest(out)
    if have is not None and not differences(have, want):
        if strict and have["skipped"]:
            raise ValueError(f"{out}: strict=True, but these shards skipped {have['skipped']} records "
                             f"(listed in {out}/skipped.jsonl)")
        check_skips(have, max_skipped, out)
        return have
    if have is None and os.path.isdir(out) and os.listdir(out):
        raise ValueError(f"{out} is a folder that holds no shards: not replacing it; give another --out")
    _worker.update(tokenizer=tokenizer, folders=[s["image_folder"] for s in want["sources"]],
                   templates=want["templates"], num_image_tokens=num_image_tokens, max_len=model_max_length,
                   regions=want["regions"], allow_outside_images=want["allow_outside_images"])
    items = ((i, where, record) for i, s in enumerate(want["sources"]) for where, record in read_source(s["path"]))
    num_proc = num_proc or os.cpu_count()
    pool = multiprocessing.get_context("fork").Pool(num_proc) if num_proc > 1 else None  # workers inherit _worker
    results = pool.imap(prepare_item, items, chunksize=64) if pool else map(prepare_item, items)
    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # what a run that was cut short left
    os.makedirs(tmp)
    files = {name: open(os.path.join(tmp, name), "wb") for name in ("ids.bin", "trained.bin", "regions.bin")}
    offsets, lengths, sources, image_index, images, region_offsets, skipped, seen = [0], [], [], [0], [], [0], [], {}
    lost = [0] * len(want["sources"])
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
                lost[source] += 1
                continue
            seen[source, digest] = where
            ids, trained, paths, regions = r
            placed = json.dumps(regions).encode() if regions else b""  # a record's regions, as JSON
            files["ids.bin"].write(ids.tobytes())
            files["trained.bin"].write(trained.tobytes())
            files["regions.bin"].write(placed)
            offsets.append(offsets[-1] + len(ids))
            region_offsets.append(region_offsets[-1] + len(placed))
            lengths.append(len(ids) + len(paths) * (num_image_tokens - 1))
            sources.append(source)
            images += paths
            image_index.append(len(images))
    finally:
        if pool:
            pool.terminate()
        for f in files.values():
            f.close()
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
    np.save(os.path.join(tmp, "region_offsets.npy"), np.asarray(region_offsets, np.int64))
    with open(os.path.join(tmp, "skipped.jsonl"), "w") as f:
        f.writelines(json.dumps(s) + "\n" for s in skipped)
    counts = np.bincount(np.asarray(sources, np.int64), minlength=len(want["sources"])).tolist()
    manifest = {**want, "records": len(lengths), "records_per_source": counts, "skipped": len(skipped),
                "skipped_per_source": lost, "skipped_by_kind": kinds}
    with open(os.path.join(tmp, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    check_skips(manifest, max_skipped, tmp)
    shutil.rmtree(out, ignore_errors=True)  # old shards of other settings (a folder of anything else was refused)
    os.replace(tmp, out)
    return json.loads(json.dumps(manifest))


def check_skips(manifest, max_skipped, where):
    """A source that yields no record, or loses more than the share max_skipped of them, stops the run."""
    lost_per_source = manifest.get("skipped_per_source", [0] * len(manifest["sources"]))  # older shards: not kept
    for s, kept, lost in zip(manifest["sources"], manifest["records_per_source"], lost_per_source):
        if not kept:
            raise ValueError(f"{s['path']}: no usable record, all {lost} skipped (is its image folder "
                             f"{s['image_folder']} right?); the reasons are in {where}/skipped.jsonl")
        if lost > max_skipped * (kept + lost):
            raise ValueError(f"{s['path']}: {lost} of its {kept + lost} records skipped, more than max_skipped="
                             f"{max_skipped} of them (is its image folder {s['image_folder']} right?); the "
                             f"reasons are in {where}/skipped.jsonl")


# training: shards -> samples -> batches --------------------------------------------------------------------

def open_image(path):
    try:
        return Image.open(path).convert("RGB")
    except Exception as e:  # deleted or damaged after preprocessing: an error naming it, never a blank image
        raise RuntimeError(f"cannot read image {path}: {e}") from e


def image_tensor(img, mode, size, mean, std):
    """An RGB image -> normalized [3, size, size] float tensor, through fit (pad fills with the mean color)."""
    img = fit(img, mode, size, tuple(int(255 * m) for m in mean))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def load_image(path, mode, size, mean, std):
    """A file -> normalized [3, size, size] float tensor (image_tensor)."""
    return image_tensor(open_image(path), mode, size, mean, std)


class ShardDataset(torch.utils.data.Dataset):
    """LLaVA's LazySupervisedDataset, from shards: samples {input_ids, labels, pixel_values [n_images, 3, H,
    W], region_masks [n_regions, H, W] bool, region_image [n_regions] (which of the sample's images)} from
    the shards in `path`. Given the model's settings (tokenizer, version, num_image_tokens,
    model_max_length, regions), shards made with others are refused, naming what differs: their ids would
    mean other tokens, or their lengths other limits. Index ~i (negative) gives record i with nothing
    trained: a stand-in for an empty micro-batch."""

    def __init__(self, path, image_size, image_mean, image_std, image_aspect_ratio="pad", tokenizer=None,
                 version=None, num_image_tokens=None, model_max_length=None, regions=None):
        self.manifest = read_manifest(path)
        if self.manifest is None:
            raise FileNotFoundError(f"{path}: no manifest.json (make shards with: python data.py --out={path} ...)")
        if tokenizer is not None:
            templates = per_source(version, len(self.manifest["sources"]), "templates")
            want = model_settings(tokenizer, templates, num_image_tokens, model_max_length, regions)
            diff = differences(self.manifest, want)
            if diff:
                raise ValueError(f"{path}: these shards were made with other settings: " + "; ".join(diff))
        self.path, self.image_args = path, (image_aspect_ratio, image_size, image_mean, image_std)
        self.check_sizes()
        self.num_image_tokens, self.image_id = self.manifest["num_image_tokens"], self.manifest["image_token_id"]
        self.lengths, self.sources, self.image_index = (self.load(f"{n}.npy")
                                                        for n in ("lengths", "sources", "image_index"))
        self.has_image = np.diff(self.image_index) > 0
        self.n_sources, self.skipped = len(self.manifest["sources"]), self.manifest["skipped"]
        self.arrays = None  # the big ones are mapped on first use, in the process that reads them

    def __len__(self):
        return len(self.lengths)

    def remake(self):
        return (f"remake the shards: delete {self.path} and run again, or python data.py --out={self.path} "
                "--data_path=... (the settings they were made with are in its manifest.json)")

    def check_sizes(self):
        """Every file holds what the manifest's records need: a copy cut short, a disk that filled up or a file
        from other shards is an error now, naming the file, and not a broadcast error steps into training.
        Cheap: the arrays' lengths from their headers (mapped, not read), the .bin files' from the file system."""
        n = self.manifest.get("records")
        if n is None:
            raise ValueError(f"{os.path.join(self.path, 'manifest.json')} gives no record count (shards of format "
                             f"{self.manifest.get('format')}; data.py writes format {FORMAT}): " + self.remake())

        def check(name, has, want, unit, why):
            if has != want:
                raise ValueError(f"{os.path.join(self.path, name)} holds {has} {unit}, but should hold {want}: {why} "
                                 "(the shards are damaged or incomplete); " + self.remake())
        ends = {}
        for name, want in [("lengths", n), ("sources", n), ("offsets", n + 1), ("image_index", n + 1),
                           ("region_offsets", n + 1)]:
            a = self.load(f"{name}.npy")
            check(f"{name}.npy", len(a), want, "entries", f"the manifest has {n} records")
            ends[name] = int(a[-1]) if len(a) else 0
        check("images.npy", len(self.load("images.npy")), ends["image_index"], "image paths",
              f"image_index.npy ends at {ends['image_index']}")
        for name, itemsize, end, what in [("ids.bin", 4, "offsets", "int32 ids"),
                                          ("trained.bin", 1, "offsets", "uint8 flags"),
                                          ("regions.bin", 1, "region_offsets", "bytes")]:
            check(name, os.path.getsize(os.path.join(self.path, name)), ends[end] * itemsize, "bytes",
                  f"{end}.npy ends at {ends[end]} {what}")

    def open(self):
        self.arrays = (self.blob("ids.bin", np.int32), self.blob("trained.bin", np.uint8), self.load("offsets.npy"),
                       self.load("images.npy"), self.blob("regions.bin", np.uint8), self.load("region_offsets.npy"))

    def load(self, name):
        path = os.path.join(self.path, name)
        try:
            return np.load(path, mmap_mode="r")
        except ValueError as e:  # a damaged header, or data cut short of what it says
            raise ValueError(f"{path}: not a readable array ({e}); " + self.remake()) from e

    def blob(self, name, dtype):
        path = os.path.join(self.path, name)
        # an empty file cannot be mapped
        return np.memmap(path, dtype, "r") if os.path.getsize(path) else np.zeros(0, dtype)

    def __getitem__(self, i):
        if self.arrays is None:
            self.open()
        ids_all, trained_all, offsets, images, regions_all, region_offsets = self.arrays
        j = ~i if i < 0 else i
        ids, trained = ids_all[offsets[j]:offsets[j + 1]], trained_all[offsets[j]:offsets[j + 1]].astype(bool)
        if i < 0:
            trained = np.zeros_like(trained)
        repeat = np.where(ids == self.image_id, self.num_image_tokens, 1)  # each image id -> its block
        ids, trained = np.repeat(ids, repeat), np.repeat(trained, repeat)
        input_ids = torch.from_numpy(ids.astype(np.int64))
        labels = torch.where(torch.from_numpy(trained), input_ids, IGNORE_INDEX)
        imgs = [open_image(images[k].decode()) for k in range(self.image_index[j], self.image_index[j + 1])]
        mode, size = self.image_args[:2]
        pixels = torch.stack([image_tensor(img, *self.image_args) for img in imgs]) if imgs else \
            torch.zeros(0, 3, size, size)
        placed = bytes(regions_all[region_offsets[j]:region_offsets[j + 1]])
        placed = json.loads(placed) if placed else {"regions": []}  # GRIT regions, all on the record's first image
        masks = [region_mask(r, placed["frame"], imgs[0].size, mode, size) for r in placed["regions"]]  # Ferret
        return {"input_ids": input_ids, "labels": labels, "pixel_values": pixels,
                "region_masks": torch.stack(masks) if masks else torch.zeros(0, size, size, dtype=torch.bool),
                "region_image": torch.zeros(len(masks), dtype=torch.long)}


def pack(lengths, capacity):
    """Lengths -> rows of indices, each row at most capacity tokens, laid out so that the rectangle they are
    padded to (rows x the longest row) is the smallest found: for each row count from the fewest that could
    hold them, the longest first, each into the shortest row so far (LPT), keeping the count that pads least.
    A record longer than capacity (none is: data.truncate) raises it to its length."""
    capacity, best = max(capacity, *lengths), None
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: equal lengths keep their order
    fewest = -(-sum(lengths) // capacity)
    # up to 16 more rows than the fewest find an even layout, cheaply; one record a row always fits
    for n_rows in [*range(fewest, min(len(lengths), fewest + 16) + 1), len(lengths)]:
        heap, rows = [(0, r) for r in range(n_rows)], [[] for _ in range(n_rows)]
        for i in order:
            used, r = heapq.heappop(heap)
            rows[r].append(i)
            heapq.heappush(heap, (used + lengths[i], r))
        longest = max(used for used, _ in heap)
        if longest <= capacity and (best is None or n_rows * longest < best[0]):
            best = (n_rows * longest, rows)
    return best[1]


def collate(samples, pad_token_id, image_token_id=None, region_token_id=None, pack_len=0):
    """LLaVA's DataCollatorForSupervisedDataset: right-pad to the longest sample; images, and regions,
    concatenated in the order their tokens appear (region_image then counts the batch's images).
    pack_len: the samples packed into rows of at most pack_len tokens (pack), each sample whole, with
    position_ids restarting at 0 for each: the LLM then keeps each sample's attention within it
    (model.check_packing), and a step computes what it would padded. Given the token ids, the positions of
    the image and region tokens, and of those whose next token trains, are found here on the CPU: the model
    then needs no boolean masks, which would wait for the device."""
    layout = pack([len(s["input_ids"]) for s in samples], pack_len) if pack_len else [[i] for i in range(len(samples))]
    rows = [[samples[i] for i in row] for row in layout]
    samples = [s for row in rows for s in row]  # in the order of the rows: the images' order
    T = max(sum(len(s["input_ids"]) for s in row) for row in rows)
    input_ids = torch.full((len(rows), T), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), T), dtype=torch.long)
    position_ids = torch.zeros((len(rows), T), dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for s in row:
            end = start + len(s["input_ids"])
            input_ids[r, start:end], labels[r, start:end] = s["input_ids"], s["labels"]
            labels[r, start] = IGNORE_INDEX  # a record's first token is never predicted: nothing comes before it
            attention_mask[r, start:end], position_ids[r, start:end] = 1, torch.arange(end - start)
            start = end
        # the padding goes on from the last record's positions: a row of one record stays a plain causal row
        position_ids[r, start:] = torch.arange(T - start) + int(position_ids[r, start - 1]) + 1
    first_image = np.cumsum([0] + [len(s["pixel_values"]) for s in samples])
    if any(len(s["region_masks"]) and not s["region_masks"].flatten(1).any(1).all() for s in samples):
        raise ValueError("an empty region mask: the region sampler would have no point to read")  # Ferret
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
             "pixel_values": torch.cat([s["pixel_values"] for s in samples]),
             "region_masks": torch.cat([s["region_masks"] for s in samples]),
             "region_image": torch.cat([s["region_image"] + int(k) for s, k in zip(samples, first_image)])}
    if pack_len:  # padded rows go without: their positions count from 0, as the LLM's own do
        batch["position_ids"] = position_ids
    if image_token_id is not None:  # flat positions in the [rows * T] tokens, in order
        batch["image_positions"] = torch.nonzero(input_ids.flatten() == image_token_id).flatten()
        if region_token_id is not None:
            batch["region_positions"] = torch.nonzero(input_ids.flatten() == region_token_id).flatten()
        batch["loss_positions"] = torch.nonzero(labels[:, 1:].flatten() != IGNORE_INDEX).flatten()
        batch["loss_positions"] += batch["loss_positions"] // (T - 1)  # [rows * (T - 1)] -> [rows * T]
    return batch


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
    LLaVA's group_by_modality_length (its LengthGroupedSampler): image and text-only records apart, and
    within each run of `size` sorted by length (less padding); the full batches are shuffled, the
    remainders of both kinds go last. One kind may be absent."""
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


def deal(records, costs, K):
    """Records -> K micro-batches of about equal cost: the costliest first, each to the cheapest micro-batch so
    far (LPT); each keeps its records in their order."""
    heap, parts = [(0.0, k) for k in range(K)], [[] for _ in range(K)]
    for j in sorted(range(len(records)), key=lambda j: -float(costs[records[j]])):
        cost, k = heapq.heappop(heap)
        parts[k].append(j)
        heapq.heappush(heap, (cost + float(costs[records[j]]), k))
    return [[records[j] for j in sorted(part)] for part in parts]


def rank_batches(batches, micro_batch, accum, rank, world, start_step=0, costs=None):
    """This rank's micro-batches (lists of indices), accum per step, from step start_step on. Global batch
    s is cut into accum * world near-equal contiguous micro-batches and the k-th goes to rank k % world; so
    a full batch gives micro_batch records each. Where a small last batch leaves a micro-batch empty, it is
    [~first record]: that record with nothing trained, so that every rank still runs (and, under DDP,
    all-reduces) each micro-step, while the loss and the gradients stay those of the real records.
    costs (packing: collate packs each micro-batch into rows), per record: the global batch's records are dealt
    to the micro-batches so that each costs about the same (deal), and the ranks finish their steps together;
    the records and the loss of a step stay the same."""
    K = accum * world
    out = []
    for chunk in batches[start_step:]:
        chunk = [int(i) for i in chunk]
        if costs is not None:
            micro = deal(chunk, costs, K)
        else:
            sizes = [len(chunk) // K + (k < len(chunk) % K) for k in range(K)]
            starts = np.cumsum([0] + sizes)
            micro = [chunk[starts[k]:starts[k + 1]] for k in range(K)]
        out += [m or [~chunk[0]] for m in micro][rank::world]
    return out


def steps_per_epoch(n, global_batch):
    return -(-n // global_batch)  # the last global batch may be smaller: every record, every epoch


def make_if_missing(path):
    """A missing file under data/<name>/ is made by data/<name>/prepare.py: the built-in datasets make
    themselves on a first run."""
    parts = os.path.normpath(path).split(os.sep)
    script = os.path.join(*parts[:2], "prepare.py") if len(parts) > 2 and parts[0] == "data" else None
    if not os.path.exists(path) and script and os.path.exists(script):
        print(f"{path} is missing: running {script}", flush=True)
        subprocess.run([sys.executable, script], check=True)


if __name__ == "__main__":
    from transformers import AutoTokenizer

    import configurator
    defaults = dict(data_path="", image_folder="", out="", tokenizer="", version="vicuna_v1", num_image_tokens=576,
                    model_max_length=2048, strict=False, num_proc=0, allow_outside_images=False, max_skipped=0.5)
    args = configurator.configure({**defaults, **ferret.REGIONS}, sys.argv[1:])  # Ferret: its settings
    if not (args["data_path"] and args["out"] and args["tokenizer"]):
        sys.exit("usage: python data.py --data_path=a.json,b.jsonl --image_folder=dirA,dirB --out=DIR --tokenizer=PATH "
                 "[--version=vicuna_v1] [--num_image_tokens=576] [--model_max_length=2048] [--strict=True] "
                 "[--allow_outside_images=True: image names may lead out of --image_folder] [--max_skipped=0.5] "
                 "[--add_region_feature=True --point_input_sample=... --no_coor=False: as train.py's]")
    tok = AutoTokenizer.from_pretrained(args["tokenizer"])
    add_tokens(tok, args["add_region_feature"])  # as train.py does
    preprocess(args["data_path"], args["image_folder"], args["out"], tok, args["version"], args["num_image_tokens"],
               args["model_max_length"], args["strict"], args["num_proc"] or None,
               regions={k: args[k] for k in ferret.REGIONS},  # Ferret
               allow_outside_images=args["allow_outside_images"], max_skipped=args["max_skipped"])
