"""
The shapes measurements of bench.py (python bench.py --what=probe, readout, binding or oracle): what a trained
shapes model knows at each image patch, and what the default's tower and its LLM each learn when taught alone.
They ask why "What color is the circle?" is learned last (BENCHMARKS.md, the default against issue 15's target).
"""
import json
import os
import random
import re
import sys

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoTokenizer

from checkpoint import WEIGHTS, load, newest
from conversation import add_tokens, chat_template, image_order, stop_string, tokenize
from data import collate, image_tensor, open_image
from model import VLM, VisionTower, VLMConfig
from pretrain_tower import caption_records as json_captions
from pretrain_tower import pair_scores, teach_tower
from sample import image_args, left_pad
from train_utils import lr_multiplier

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "shapes"))
import prepare  # noqa: E402  (the shapes generator: its scenes, captions and questions)
from prepare import COLORS, SHAPES  # noqa: E402


def has_shapes(data):
    if not os.path.exists(os.path.join(data, "val.json")):
        print(f"no shapes data in {data}: python data/shapes/prepare.py makes it")
        return False
    return True


def caption_objects(caption):
    """A shapes caption ('a red circle and a blue square.') -> [(color, shape)], in its order."""
    return re.findall(r"an? (\w+) (\w+)", caption)


def patch_labels(path, caption, grid, colors):
    """The shapes image's patches on a grid x grid raster (the image tokens' order): for each patch whose
    center pixel is an object's (its color near one of colors), (patch index, color, that object's shape),
    the shape read from the caption ('a red circle and a blue square.')."""
    shape_of = dict(caption_objects(caption))
    img = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
    out = []
    for k in range(grid * grid):
        y, x = (int((v + 0.5) * img.shape[0] / grid) for v in divmod(k, grid))
        dist = {c: np.abs(img[y, x] - rgb).sum() for c, rgb in colors.items()}
        color = min(dist, key=dist.get)
        if dist[color] < 60 and color in shape_of:
            out.append((k, color, shape_of[color]))
    return out


def caption_records(data, split, limit=None):
    """The shapes split's caption records (one per image, naming every object), the first `limit`."""
    with open(os.path.join(data, f"{split}.json")) as f:
        return [r for r in json.load(f) if r["id"].endswith("_caption")][:limit]


def linear_probe(x_train, y_train, x_test, y_test, steps=300):
    """Logistic regression (full batch, AdamW, standardized inputs) -> accuracy on the test set."""
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    n_classes = int(max(y_train.max(), y_test.max())) + 1
    probe = torch.nn.Linear(x_train.shape[1], n_classes)
    opt = torch.optim.AdamW(probe.parameters(), lr=0.05, weight_decay=1e-2)
    for _ in range(steps):
        loss = F.cross_entropy(probe(x_train), y_train)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (probe(x_test).argmax(-1) == y_test).float().mean().item()


def bench_probe(data="data/shapes", n_train=1500, out_dir="out-shapes", seed=1337):
    """What a trained shapes model knows at each image patch ("What color is the circle?" needs the circle's
    patches found by their shape): a linear probe of the patch's color and of its object's shape,
    from the tower's features, the projector's output, and the LLM's hidden state at the patch's image token
    after each layer (the image read under the chat template, before any question). Over the patches whose
    center lies in an object; fitted on n_train train images, scored on the val images. Chance: color 1/6,
    shape 1/3 (a model that has the shape in every patch of its object scores 1)."""
    ckpt = newest(out_dir, names=WEIGHTS)
    if ckpt is None:
        print(f"no checkpoint in {out_dir}: train one first (python train.py), or name it: --out_dir=...")
        return
    model, config = load(ckpt)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    template = chat_template(config["train"]["version"])
    message = [{"from": "human", "value": "<image>\nWhat color is the circle?"}]
    ids = torch.tensor([tokenize(template, message, tokenizer, model.num_image_tokens)[0]])
    copies = len(image_order(template, message))  # vicuna_v1_image_both: the probe reads the first
    positions = (ids[0] == model.image_token_id).nonzero().squeeze(1)
    grid = int(model.num_image_tokens ** 0.5)
    args = image_args(model, config["train"])
    colors, shapes = list(COLORS), SHAPES
    sets = {}
    for split, limit in (("train", n_train), ("val", None)):
        feats, labels = {}, []
        for r in caption_records(data, split, limit):
            path = os.path.join(data, r["image"])
            patches = patch_labels(path, r["conversations"][1]["value"], grid, COLORS)
            if not patches:
                continue
            with torch.no_grad():
                pixels = image_tensor(open_image(path), *args).unsqueeze(0)
                tower, projected = model.encode_images(pixels)
                emb = model.embed(ids, pixels.expand(copies, -1, -1, -1))
                hidden = model.llm.base_model(inputs_embeds=emb, output_hidden_states=True).hidden_states[1:]
            index = torch.tensor([k for k, _, _ in patches])
            layers = {"tower": tower[0], "projector": projected[0],
                      **{f"LLM layer {i + 1}": h[0, positions] for i, h in enumerate(hidden)}}
            for name, f in layers.items():
                feats.setdefault(name, []).append(f[index].float())
            labels += [(colors.index(c), shapes.index(s)) for _, c, s in patches]
        sets[split] = ({k: torch.cat(v) for k, v in feats.items()}, torch.tensor(labels))
    (train_x, train_y), (val_x, val_y) = sets["train"], sets["val"]
    print(f"{ckpt}: {len(train_y)} train patches ({n_train} images), {len(val_y)} val patches; chance: color "
          f"1/{len(colors)}, shape 1/{len(shapes)}")
    print("| features | color | its object's shape |")
    print("|---|---|---|")
    torch.manual_seed(seed)  # the probes' initial weights
    for name in train_x:
        acc = [linear_probe(train_x[name], train_y[:, j], val_x[name], val_y[:, j]) for j in (0, 1)]
        print(f"| {name} | {acc[0]:.3f} | {acc[1]:.3f} |")


def train_readout(tower, head, n, loss_of, score, steps, batch_size, every, seed):
    """Train the tower and its head by AdamW 2e-3 on loss_of(a batch of train indices of n) -> score() on the
    val images every `every` steps, the tower in eval mode there."""
    opt = torch.optim.AdamW([*tower.parameters(), *head.parameters()], lr=2e-3)
    gen = torch.Generator().manual_seed(seed)
    row = []
    for step in range(1, steps + 1):
        tower.train()
        loss = loss_of(torch.randint(n, (batch_size,), generator=gen))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % every == 0:
            tower.eval()
            with torch.no_grad():
                row.append(score())
    return row


def readout_pool(features, kind, inside, grid):
    """[N, tokens, C] patch features -> [N, C]: how a reader of the image tokens gathers them. 'max' per channel;
    'mean' over all patches (softmax attention at its uniform start: LLaVA's LLM reading CLIP's patches);
    'object mean' over the object's patches (attention that has found the object); 'mean of 3x3 max' the mean
    after a max over each patch's neighbours."""
    if kind == "max":
        return features.max(1).values
    if kind == "object mean":
        w = inside.float().unsqueeze(-1)
        return (features * w).sum(1) / w.sum(1)
    if kind == "mean of 3x3 max":
        maps = features.transpose(1, 2).reshape(len(features), -1, *grid)
        features = F.max_pool2d(maps, 3, 1, 1).flatten(2).transpose(1, 2)
    return features.mean(1)


def bench_readout(data="data/shapes", steps=300, n_train=8000, batch_size=32, every=100, seed=1337,
                  readouts=("per patch", "max", "mean", "object mean", "mean of 3x3 max")):
    """Why the default reads an object's color long before its shape (bench_probe finds shape in half of an
    object's patches): the default's random tower trained on the shape of single-object images alone, with
    no LLM, through each readout, AdamW 2e-3, batch 32. 'per patch': each of the object's patches predicts
    it. Prints the val accuracy every `every` steps (chance 1/3)."""
    if not has_shapes(data):
        return
    spec = VLMConfig().vision_tower
    first = VisionTower(spec, select_layer=-1)
    grid, args = first.grid, ("pad", first.image_size, first.image_mean, first.image_std)  # as train.py feeds it
    sets = {}
    for split, limit in (("train", n_train), ("val", None)):
        pixels, labels, inside = [], [], []
        for r in caption_records(data, split, limit):
            path = os.path.join(data, r["image"])
            patches = patch_labels(path, r["conversations"][1]["value"], grid[0], COLORS)
            if len(caption_objects(r["conversations"][1]["value"])) != 1 or not patches:
                continue  # a single object, some of whose patches are found
            pixels.append(image_tensor(open_image(path), *args))
            labels.append(SHAPES.index(patches[0][2]))
            inside.append(np.isin(np.arange(grid[0] * grid[1]), [k for k, _, _ in patches]))
        sets[split] = torch.stack(pixels), torch.tensor(labels), torch.from_numpy(np.stack(inside))
    print(f"{len(sets['train'][1])} train and {len(sets['val'][1])} val single-object images; "
          f"tower {spec['model_type']} {spec['hidden_sizes']}, depths {spec['depths']}")
    print("| readout | " + " | ".join(f"step {k}" for k in range(every, steps + 1, every)) + " |")
    print("|---|" + "---|" * (steps // every))
    for kind in readouts:
        torch.manual_seed(seed)
        tower = VisionTower(spec, select_layer=-1)
        tower.requires_grad_(True)
        head = torch.nn.Linear(tower.hidden_size, len(SHAPES))

        def logits(x, inside):
            features = tower(x)
            return head(features) if kind == "per patch" else head(readout_pool(features, kind, inside, grid))

        def loss_and_hits(x, y, inside):
            out = logits(x, inside)
            if kind == "per patch":  # each of the object's patches, on its own
                out, y = out[inside], y.unsqueeze(1).expand(inside.shape)[inside]
            return F.cross_entropy(out, y), (out.argmax(-1) == y).float().mean().item()

        row = train_readout(tower, head, len(sets["train"][1]),
                            lambda i: loss_and_hits(*(t[i] for t in sets["train"]))[0],
                            lambda: loss_and_hits(*sets["val"])[1], steps, batch_size, every, seed)
        print(f"| {kind} | " + " | ".join(f"{a:.3f}" for a in row) + " |")


def read_binding(scores, objects, n_shapes):
    """Both binding questions answered off the pair scores [N, colors * shapes]: per object, the best color for
    its shape ("What color is the circle?") and the best shape for its color -> (the two accuracies)."""
    grid = scores.view(len(scores), -1, n_shapes)
    hits = [(grid[i, :, s].argmax().item() == c, grid[i, c].argmax().item() == s)
            for i, objs in enumerate(objects) for c, s in objs]
    return tuple(float(np.mean([h[j] for h in hits])) for j in (0, 1))


def bench_binding(data="data/shapes", steps=500, n_train=8000, batch_size=32, every=100, seed=1337, save_tower=""):
    """Whether the default's random tower can bind a color to a shape at its patches when taught directly (the LLM
    learns "What color is the circle?" last, bench_probe): pretrain_tower.teach_tower, as train.py's tower_iters
    runs it, on the first n_train of captions.json (images of 1-3 objects), no LLM, AdamW 2e-3, batch 32. Prints
    both binding questions answered off the head's (color, shape) pairs on the val images every `every` steps
    (chance: 1/6 and 1/3; one of the image's colors at random: about 0.6); save_tower: a folder for the
    trained tower (an HF ConvNeXt, for train.py's vision_tower)."""
    if not has_shapes(data):
        return
    colors = list(COLORS)
    torch.manual_seed(seed)
    tower = VisionTower(VLMConfig().vision_tower, select_layer=-1)
    args = ("pad", tower.image_size, tower.image_mean, tower.image_std)  # as train.py feeds it
    items = json_captions(os.path.join(data, "captions.json"), data)[:n_train]
    val = [(os.path.join(data, r["image"]), r["conversations"][1]["value"]) for r in caption_records(data, "val")]
    val_x = torch.stack([image_tensor(open_image(path), *args) for path, _ in val])
    val_objects = [[(colors.index(c), SHAPES.index(s)) for c, s in caption_objects(text)] for _, text in val]
    rows = []

    def report(step, loss, head, index):
        scores = torch.cat([pair_scores(tower, head, val_x[i:i + 250]) for i in range(0, len(val_x), 250)])
        pairs = torch.full((len(scores), len(colors) * len(SHAPES)), -float("inf"))  # a pair never seen: never best
        for k, (c, s) in enumerate((c, s) for c in colors for s in SHAPES):
            if f"{c} {s}" in index:
                pairs[:, k] = scores[:, index[f"{c} {s}"]]
        rows.append((step, *read_binding(pairs, val_objects, len(SHAPES))))

    teach_tower(tower, items, args, steps, batch_size, 2e-3, "cpu", seed, report=report, every=every)
    print(f"{len(items)} train and {len(val)} val images of 1-3 objects")
    print("| step | color of the shape | shape of the color |")
    print("|---|---|---|")
    for step, color, shape in rows:
        print(f"| {step} | {color:.3f} | {shape:.3f} |")
    if save_tower:
        tower.encoder.save_pretrained(save_tower)
        print(f"tower: {save_tower} (python train.py --vision_tower={save_tower})")


def oracle_features(objects, grid, width, size):
    """A perfect tower's patch features for prepare.py's objects [(shape, color, box)]: each patch whose center lies
    in an object's box holds its color and its shape, one-hot; every other patch a 'background' one-hot."""
    colors, background = list(COLORS), len(COLORS) + len(SHAPES)
    feats = torch.zeros(grid * grid, width)
    feats[:, background] = 1
    for shape, color, (x1, y1, x2, y2) in objects:
        for k in range(grid * grid):
            y, x = ((v + 0.5) * size / grid for v in divmod(k, grid))
            if x1 <= x < x2 and y1 <= y < y2:
                feats[k] = 0
                feats[k, [colors.index(color), len(COLORS) + SHAPES.index(shape)]] = 1
    return feats


def oracle_sample(rng, tokenizer, template, num_image_tokens, width, size, ask=None):
    """A new shapes scene (prepare.py's generator, not drawn) -> a training record as collate takes it, its image the
    oracle features; or, with ask (a question type), (prompt ids, features, answer) of that question as the eval
    asks it (eval.py: the first turn)."""
    objects = prepare.place_shapes(rng, size)
    feats = oracle_features(objects, int(num_image_tokens ** 0.5), width, size)
    if ask:
        _, question, answer = next(q for q in prepare.questions(rng, objects, size) if q[0] == ask)
        ids = tokenize(template, [{"from": "human", "value": "<image>\n" + question}], tokenizer, num_image_tokens)[0]
        return ids, feats, answer
    messages = []
    for k, (question, answer) in enumerate(prepare.conversation(rng, objects, size)):
        messages += [{"from": "human", "value": "<image>\n" * (k == 0) + question}, {"from": "gpt", "value": answer}]
    ids, labels = tokenize(template, messages, tokenizer, num_image_tokens)
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "pixel_values": feats[None],
            "region_masks": torch.zeros(0, size, size, dtype=torch.bool),
            "region_image": torch.zeros(0, dtype=torch.long)}


def oracle_accuracy(model, tokenizer, template, val):
    """Greedy exact match on [(prompt ids, features, answer)], as eval.py scores a first turn."""
    input_ids, attention_mask = left_pad([ids for ids, _, _ in val], tokenizer.pad_token_id)
    new = model.generate(input_ids, attention_mask, torch.stack([f for _, f, _ in val]), max_new_tokens=8,
                         stop_token_ids={tokenizer.eos_token_id})
    stop = stop_string(template, tokenizer)
    answers = [t.split(stop)[0].strip() for t in tokenizer.batch_decode(new.tolist(), skip_special_tokens=True)]
    return float(np.mean([a == want for a, (_, _, want) in zip(answers, val)]))


def bench_oracle(data="data/shapes", steps=600, batch_size=32, every=200, n_val=300, seed=1337,
                 kinds=("color", "shape", "count", "exists")):
    """Whether the default's LLM learns the shapes questions from a perfect tower (bench_binding teaches the tower;
    this asks the LLM alone): its patch features are the objects' colors and shapes written out (oracle_features),
    through the default's projector into the default's LLM, on the default's conversations (prepare.py's, a new
    scene each record, in the vicuna_v1 template), trained as train.py trains its chat stage (AdamW 2e-3, batch
    32, warmup 3%, cosine to 1e-4, clip 1). Prints the val accuracy per question type (greedy, first turn) every
    `every` steps; a model that names one of the image's colors at random gets about 0.6 on color."""
    if not has_shapes(data):
        return
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(data, "tokenizer"))
    add_tokens(tokenizer)
    model = VLM(VLMConfig(vocab_size=len(tokenizer), image_token_id=tokenizer.convert_tokens_to_ids("<image>")))
    model.encode_images = lambda feats: (feats, model.mm_projector(feats))  # the oracle's features are the tower's
    width, size, template = model.vision_tower.hidden_size, model.vision_tower.image_size, "vicuna_v1"
    args = (tokenizer, template, model.num_image_tokens, width, size)
    val = {k: [oracle_sample(random.Random(f"oracle-val-{k}-{i}"), *args, ask=k) for i in range(n_val)] for k in kinds}
    params = [*model.llm.parameters(), *model.mm_projector.parameters()]
    opt = torch.optim.AdamW(params, lr=2e-3, betas=(0.9, 0.98), weight_decay=0.0)
    rng = random.Random(seed)
    print("| step | train loss | " + " | ".join(kinds) + " |")
    print("|---|---|" + "---|" * len(kinds))
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = 2e-3 * lr_multiplier(step, [0], steps, 0, 0.03, 1e-4 / 2e-3)
        model.train()
        batch = collate([oracle_sample(rng, *args) for _ in range(batch_size)], tokenizer.pad_token_id,
                        model.image_token_id)
        loss = model(batch)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if (step + 1) % every == 0:
            model.eval()
            with torch.no_grad():
                acc = [oracle_accuracy(model, tokenizer, template, val[k]) for k in kinds]
            print(f"| {step + 1} | {loss.item():.3f} | " + " | ".join(f"{a:.3f}" for a in acc) + " |", flush=True)
