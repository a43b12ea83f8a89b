"""
Teach a vision tower alone, before the LLM sees it (train.py's tower_iters): a linear head on each patch scores
the word pairs of the captions ("red circle"), an image's score for a pair is its best patch's, and binary
cross-entropy trains them against the pairs its caption holds. It is CatLIP's pretraining (the words of a
caption as the classes of an image classifier) with pairs of words as the classes. A from-scratch tower taught
through the LLM alone learns which colors an image holds but not which color is the circle's; pairs make the
best patch for "red circle" a red patch that knows its object is a circle (BENCHMARKS.md, issue 15).
"""
import json
import os
import re
from collections import Counter
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from data import load_image


# function words: a pair with one of them ("a red", "circle and") names no object, and its class only dilutes the
# pairs that do (on shapes, 0.92 against 0.99 for "What color is the circle?" read off the head: BENCHMARKS.md)
FUNCTION_WORDS = {"a", "an", "the", "and", "or", "of", "in", "on", "at", "to", "with", "by", "for", "from", "is",
                  "are", "it", "its", "this", "that", "there", "some"}


def caption_pairs(text):
    """A caption -> its pairs of adjacent words, lower case, punctuation dropped, none with a function word:
    'a red circle and a blue square.' -> ['red circle', 'blue square']."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    return [f"{a} {b}" for a, b in zip(words, words[1:]) if a not in FUNCTION_WORDS and b not in FUNCTION_WORDS]


def caption_records(path, folder):
    """(image path, caption) of each record of a JSON data file that has an image and one reply: a caption."""
    with open(path) as f:
        records = json.load(f)
    items = [(os.path.join(folder, r["image"]), r["conversations"][-1]["value"]) for r in records
             if r.get("image") and len(r.get("conversations", ())) == 2]
    if not items:
        raise ValueError(f"{path}: no records with an image and one reply (a caption) to teach the tower from")
    return items


def pair_classes(captions, n_classes):
    """The n_classes word pairs in the most captions (ties in the order first seen)."""
    counts = Counter(p for c in captions for p in dict.fromkeys(caption_pairs(c)))
    return [p for p, _ in counts.most_common(n_classes)]


def pair_scores(tower, head, pixels):
    """[N, 3, H, W] -> [N, classes]: each pair's score, its best patch's (a max over the patches)."""
    return head(tower(pixels)).amax(1)


def pair_targets(captions, index):
    """[N, classes] of 0/1: the pairs each caption holds, of those in index (pair -> class)."""
    targets = torch.zeros(len(captions), len(index))
    for row, caption in enumerate(captions):
        targets[row, [index[p] for p in caption_pairs(caption) if p in index]] = 1.0
    return targets


def teach_tower(tower, items, image_args, steps, batch_size, lr, device, seed, autocast=nullcontext(), report=None,
                every=100, n_classes=256):
    """Train the tower (all of its parameters that reach its features) and a new head on the pairs of items'
    captions (caption_records) for `steps` steps of batch_size random items, AdamW at a constant lr (with a
    cosine down to 5% it taught less in 500 steps on shapes: 0.82 against 0.92).
    report(step, loss, head, index), every `every` steps, sees how it goes. -> the head and index (pair ->
    class)."""
    index = {p: k for k, p in enumerate(pair_classes([c for _, c in items], n_classes))}
    if not index:
        raise ValueError(f"no pair of adjacent words without a function word in {len(items)} captions to teach from")
    was = {p: p.requires_grad for p in tower.parameters()}
    tower.requires_grad_(True)
    tower.freeze_unused()
    head = torch.nn.Linear(tower.hidden_size, len(index), device=device)
    params = [p for p in tower.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    tower.train()
    for step in range(steps):
        batch = [items[i] for i in torch.randint(len(items), (batch_size,), generator=gen).tolist()]
        pixels = torch.stack([load_image(path, *image_args) for path, _ in batch]).to(device)
        targets = pair_targets([c for _, c in batch], index).to(device)
        with autocast:
            scores = pair_scores(tower, head, pixels)
        loss = F.binary_cross_entropy_with_logits(scores.float(), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if report and ((step + 1) % every == 0 or step + 1 == steps):
            tower.eval()
            with torch.no_grad():
                report(step + 1, loss.item(), head, index)
            tower.train()
    tower.zero_grad(set_to_none=True)  # a gradient left on the tower would count in the run's gradient norm
    for p, flag in was.items():
        p.requires_grad_(flag)
    tower.train(False)
    return head, index
