"""
Everything Ferret adds to LLaVA (Ferret, "Refer and Ground Anything Anywhere at Any Granularity", and its
GRIT data): regions of the image as input, boxes as text in and out.

- GRIT records: a LLaVA record with image_w, image_h (the pixel frame of its boxes), box_x1y1x2y2 (per
  message, the pixel boxes that its <bbox_location{i}> placeholders name) and optionally masks (per message
  and box, the object's segmentation: COCO RLE or polygons). In a human message a placeholder becomes the
  region as text and a <region_fea> token, "[x1, y1, x2, y2] <region_fea>" or "[x, y] <region_fea>" (box or
  point, drawn per message), whose embedding the model's region sampler fills from the image inside the
  region; in a reply it becomes the box as text, which the model learns to write (grounding). Text
  coordinates are integers on Ferret's 0-999 grid, x to the right, y down.
- Region masks in the image's own pixels; data.region_mask puts them through the image's transform.
- RegionSampler: Ferret's GeoRegionSampler, a region's features -> the embedding of its <region_fea> token.

data.py and model.py import this file, and it imports neither. A LLaVA-only fork deletes it and the
lines marked "# Ferret" in data.py, model.py, train.py and sample.py (README.md says how).
"""
import re

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw

from conversation import REGION_TOKEN

PLACEHOLDER = re.compile(r"<bbox_location(\d+)>")
# place_regions' settings, with their defaults: what shards record, and data.py's command line takes
REGIONS = dict(add_region_feature=False, no_coor=False, point_input_sample="segment_mask|center")
POINT_RADIUS = 5  # a point region is the (2r+1)-pixel square around it (within the object), as in Ferret


class BadRegion(ValueError):
    """A GRIT record whose regions break a rule; data.py skips the record (its reason reads 'kind: details')."""


def grid(v, size):
    """A pixel coordinate -> Ferret's 0-999 grid (clamped to the image, then truncated, as Ferret does)."""
    return int(min(max(v, 0), size - 1) * 1000 / size)


def region_text(region, w, h):
    """'[x1, y1, x2, y2]' for a box, '[x, y]' for a point, on the grid of a w x h image."""
    if region["kind"] == "point":
        x, y = region["point"]
        return f"[{grid(x, w)}, {grid(y, h)}]"
    x1, y1, x2, y2 = region["box"]
    return f"[{grid(x1, w)}, {grid(y1, h)}, {grid(x2, w)}, {grid(y2, h)}]"


def rle_counts(counts):
    """COCO's compressed RLE string -> run lengths (6 bits a character, 5 of them data, the sixth 'more';
    from the third run on, each is coded as its difference to the run two before)."""
    runs, p = [], 0
    while p < len(counts):
        x, k, more = 0, 0, True
        while more:
            c = ord(counts[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p, k = p + 1, k + 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)  # negative
        runs.append(x + (runs[-2] if len(runs) > 2 else 0))
    return runs


def decode_segment(seg, w, h):
    """A segmentation -> bool [h, w]: COCO RLE ({"size": [h, w], "counts": str or list}, runs of 0s and 1s
    down the columns) or polygons ([[x0, y0, x1, y1, ...], ...], in pixels)."""
    if isinstance(seg, dict):
        if list(seg.get("size", [])) != [h, w]:
            raise BadRegion(f"bad segmentation: its size {seg.get('size')} is not the image's [{h}, {w}]")
        counts = seg["counts"]
        runs = rle_counts(counts) if isinstance(counts, str) else list(counts)
        if sum(runs) != h * w or min(runs, default=0) < 0:
            raise BadRegion(f"bad segmentation: its runs cover {sum(runs)} pixels, not {h} x {w}")
        return np.repeat(np.arange(len(runs)) % 2 == 1, runs).reshape(w, h).T
    if isinstance(seg, list) and seg and all(isinstance(p, list) and len(p) % 2 == 0 for p in seg):
        img = Image.new("L", (w, h))
        for poly in seg:
            if len(poly) >= 6:  # fewer than 3 points (COCO has some) cover nothing, as pycocotools finds too
                ImageDraw.Draw(img).polygon([float(v) for v in poly], fill=1)
        return np.asarray(img, bool)
    raise BadRegion(f"bad segmentation: neither COCO RLE nor polygons: {str(seg)[:80]}")


def sample_point(box, segment, mode, rng):
    """A point inside an object, in pixels, as Ferret's point_input_sample draws it: 'center' (of the
    box), 'gaussian' (around the center, std 0.15 of the box, redrawn until inside it), and with a
    segmentation 'segment_mask|uniform' (any pixel of the object) or 'segment_mask|center' (the object's
    pixel nearest the box center; without a segmentation these two fall back to 'gaussian')."""
    x1, y1, x2, y2 = box
    center = np.array([(x1 + x2) / 2, (y1 + y2) / 2])
    if mode.startswith("segment_mask|") and segment is not None and segment.any():
        ys, xs = np.nonzero(segment)
        if mode == "segment_mask|uniform":
            k = rng.integers(len(xs))
        elif mode == "segment_mask|center":
            k = np.argmin((xs - center[0]) ** 2 + (ys - center[1]) ** 2)
        else:
            raise ValueError(f"point_input_sample={mode!r}")
        return [int(xs[k]), int(ys[k])]
    if mode == "center":
        return [int(center[0]), int(center[1])]
    if mode not in ("gaussian", "segment_mask|uniform", "segment_mask|center"):
        raise ValueError(f"point_input_sample={mode!r}: use 'center', 'gaussian', 'segment_mask|uniform' or "
                         "'segment_mask|center'")
    std = 0.15 * np.array([x2 - x1, y2 - y1])
    for _ in range(100):
        p = rng.normal(center, std)
        if x1 <= p[0] <= x2 and y1 <= p[1] <= y2:
            return [int(p[0]), int(p[1])]
    return [int(center[0]), int(center[1])]


def place_regions(record, messages, rng, add_region_feature=True, no_coor=False,
                  point_input_sample="segment_mask|center", form=None):
    """A GRIT record's placeholders -> text: (messages, regions), the regions in the order of their
    <region_fea> tokens, each {"kind": "box" | "point", "box", "point", "segment"} in pixels of image_w x
    image_h. A human message's regions are all boxes or all points (form, or drawn 50/50 per message, as
    Ferret does); without add_region_feature they are their coordinates only, and with no_coor their token
    alone (the region's features carry where it is); a reply's boxes are always text. A box partly outside
    the image is clamped to it (as Ferret does); one wholly outside is a skip."""
    w, h, boxes = record.get("image_w"), record.get("image_h"), record["box_x1y1x2y2"]
    if not (isinstance(w, (int, float)) and isinstance(h, (int, float)) and w > 0 and h > 0):
        raise BadRegion("bad box: boxes given without a positive image_w and image_h")
    masks = record.get("masks") or [None] * len(boxes if isinstance(boxes, list) else [])
    if not (isinstance(boxes, list) and len(boxes) == len(messages) and isinstance(masks, list)
            and len(masks) == len(boxes)):
        raise BadRegion(f"bad box: box_x1y1x2y2 (and masks) must hold a list per message, {len(messages)} of them")
    regions, out = [], []
    for j, (m, turn, turn_masks) in enumerate(zip(messages, boxes, masks)):
        if not isinstance(turn or [], list) or not isinstance(turn_masks or [], list):
            raise BadRegion(f"bad box: message {j}'s boxes (and masks) are not a list: {str(turn)[:80]}")
        turn, turn_masks = list(turn or []), turn_masks or [None] * len(turn or [])
        for b, box in enumerate(turn):
            if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)
                    and box[0] <= box[2] and box[1] <= box[3]):
                raise BadRegion(f"bad box: {box!r} is not [x1, y1, x2, y2] with x1 <= x2, y1 <= y2")
            if box[2] < 0 or box[3] < 0 or box[0] > w or box[1] > h:
                raise BadRegion(f"box outside the image: {box} in {w}x{h}")
            turn[b] = [min(max(v, 0), size) for v, size in zip(box, (w, h, w, h))]
        # decoded here, if only to check them
        decoded = [decode_segment(seg, int(w), int(h)) if seg is not None else None for seg in turn_masks]
        human = m["from"] == "human"
        kind = (form or ("point" if rng.random() < 0.5 else "box")) if human else "box"

        def replace(match):
            i = int(match[1])
            if i >= len(turn):
                raise BadRegion(f"bad placeholder: {match[0]} in message {j}, which has {len(turn)} boxes")
            if not human:  # its box as text, no_coor or not (Ferret's code empties it: a grounding reply says nothing)
                return region_text({"kind": "box", "box": turn[i]}, w, h)
            segment, mask = (turn_masks[i], decoded[i]) if i < len(turn_masks) else (None, None)
            region = {"kind": kind, "box": turn[i], "segment": segment,
                      "point": sample_point(turn[i], mask, point_input_sample, rng) if kind == "point" else None}
            if not add_region_feature:
                return region_text(region, w, h)
            regions.append(region)
            return REGION_TOKEN if no_coor else region_text(region, w, h) + " " + REGION_TOKEN
        out.append({**m, "value": PLACEHOLDER.sub(replace, m["value"])})
    return out, regions


def place(record, messages, sizes, rng, regions=None):
    """A record's GRIT regions -> (messages with the placeholders written out, {"frame": [image_w, image_h],
    "regions": [...]} or None). sizes: its image files' sizes. A record without box_x1y1x2y2 must have no
    placeholder."""
    if record.get("box_x1y1x2y2") is None:
        if any(PLACEHOLDER.search(m["value"]) for m in messages):
            raise BadRegion("bad placeholder: <bbox_location{i}> in a record without box_x1y1x2y2")
        return messages, None
    if len(sizes) != 1:
        raise BadRegion(f"regions on {len(sizes)} images: GRIT's regions are on its record's one image")
    messages, found = place_regions(record, messages, rng, **(regions or {}))
    (w, h), frame = sizes[0], [record["image_w"], record["image_h"]]
    # the boxes' frame is the file's size, or the file is a scaled copy (rounding moves the aspect a little)
    if abs(w * frame[1] - h * frame[0]) > 0.02 * w * frame[1]:
        raise BadRegion(f"image size: the boxes are given in {frame[0]}x{frame[1]}, the file is {w}x{h}")
    return messages, {"frame": frame, "regions": found}


def settings(regions, tokenizer):
    """place_regions' settings, checked, with their defaults filled in (what shards made with them record)."""
    regions = {**REGIONS, **(regions or {})}
    if regions["add_region_feature"] and REGION_TOKEN not in tokenizer.get_vocab():
        raise ValueError(f"add_region_feature=True, but the tokenizer has no {REGION_TOKEN} token")
    if regions["no_coor"] and not regions["add_region_feature"]:
        raise ValueError("no_coor=True needs add_region_feature=True: without coordinates or features a region is "
                         "nothing")
    return regions


def region_pixels(region, frame, image_size):
    """A region -> (float [h, w], 1 inside, of the image file's own pixels; its center there): its coordinates
    scaled from the record's frame, image_w x image_h, to the file's size. A box is the box (within the
    object, where a segmentation overlaps it: a free-form region); a point, the square around it within the
    object (as Ferret), or else within its box (unless the box is the point itself, as sample.py gives one)."""
    (fw, fh), (w, h) = frame, image_size
    sx, sy = w / fw, h / fh

    def area(x1, y1, x2, y2):  # the pixels [x1, x2] x [y1, y2] of the file, as 0/1
        a = np.zeros((h, w), np.float32)
        a[max(0, int(y1 * sy)):int(y2 * sy) + 1, max(0, int(x1 * sx)):int(x2 * sx) + 1] = 1
        return a
    x1, y1, x2, y2 = region["box"]
    box = area(x1, y1, x2, y2)
    segment = None
    if region["segment"] is not None:
        segment = decode_segment(region["segment"], int(fw), int(fh)).astype(np.float32)
        segment = np.asarray(Image.fromarray(segment).resize((w, h), Image.NEAREST))
    if region["kind"] == "point":
        (cx, cy), r = region["point"], POINT_RADIUS
        shape = area(cx - r, cy - r, cx + r, cy + r)
        bound = segment if segment is not None else box if (x2 > x1 or y2 > y1) else None
    else:
        (cx, cy), shape, bound = ((x1 + x2) / 2, (y1 + y2) / 2), box, segment
    if bound is not None and (shape * bound).any():
        shape = shape * bound
    return shape, (cx * sx, cy * sy)


# the region sampler -----------------------------------------------------------------------------------------

def sample_points(masks, n):
    """n points inside each mask [R, H, W] -> [R, n, 2], (x, y) in [0, 1] at pixel centers: every pixel of
    the mask once, in random order, when it has n or more; else all of them, then again in the same order.
    All regions at once, with no host wait: the mask's pixels are put first in a random order of all pixels.
    A mask must not be empty (data.collate checks, on the CPU; data.region_mask never makes one)."""
    R, H, W = masks.shape
    inside = masks.flatten(1)
    order = (torch.rand(R, H * W, device=masks.device) + inside).argsort(1, descending=True)
    k = inside.sum(1, keepdim=True).clamp(min=1)  # the mask's pixels come first in order
    pick = order.gather(1, torch.arange(n, device=masks.device).expand(R, n) % k)
    return torch.stack([(pick % W + 0.5) / W, (pick // W + 0.5) / H], -1)


def features_at(feature_maps, xy):
    """The features of maps [R, C, h, w] at points [R, n, 2] -> [R, n, C], bilinear between the patches'
    centers (beyond the outer centers, the edge patch's). grid_sample takes (x, y), x along the width: the
    order the points are in (Ferret's released code passes them as (y, x), and so reads every region
    mirrored across the diagonal)."""
    grid = (xy * 2 - 1).unsqueeze(2).to(torch.float32)  # [R, n, 1, 2] in [-1, 1], pixel centers: align_corners=False
    out = F.grid_sample(feature_maps.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.squeeze(-1).transpose(1, 2).to(feature_maps.dtype)


def farthest_points(xy, n):
    """Farthest point sampling: n indices [R, n] of points [R, N, 2] that spread over the region, each the
    farthest from those before it (from the first point: the points are in random order already)."""
    R, N, _ = xy.shape
    idx = torch.zeros(R, n, dtype=torch.long, device=xy.device)
    nearest = torch.full((R, N), float("inf"), device=xy.device)
    far = torch.zeros(R, dtype=torch.long, device=xy.device)
    rows = torch.arange(R, device=xy.device)
    for i in range(n):
        idx[:, i] = far
        nearest = torch.minimum(nearest, ((xy - xy[rows, far].unsqueeze(1)) ** 2).sum(-1))
        far = nearest.argmax(-1)
    return idx


def take(x, idx):
    """x [R, N, ...] at indices idx [R, ...] -> [R, ..., ...]."""
    rows = torch.arange(len(x), device=x.device).view(-1, *[1] * (idx.dim() - 1))
    return x[rows, idx]


class RegionSampler(nn.Module):
    """A region of the image -> one embedding for its <region_fea> token (Ferret's spatial-aware visual
    sampler, GeoRegionSampler). num_init_point points are drawn inside the region's mask and read from the
    tower's feature map; then, per stage, num_sub_point of them spread over the region (farthest point
    sampling) each gather their num_neighbor nearest, whose features and positions relative to it are
    fused (Linear, then with the point's own [feature, position] a Linear, ReLU and LayerNorm) and pooled
    (mean or max) into the point's new feature; the last stage's points are flattened and projected to the
    LLM's width. geo=False is the simple option: the mean of the features at the points, projected.
    model.VLMConfig holds the settings and their defaults (Ferret's)."""

    def __init__(self, dim, out_dim, geo, num_init_point, num_sub_point, num_neighbor, pooler):
        super().__init__()
        if pooler not in ("mean", "max"):
            raise ValueError(f"sampler_pooler_mode={pooler!r}: use 'mean' or 'max'")
        shrinking = num_init_point >= num_sub_point[0] and list(num_sub_point) == sorted(num_sub_point, reverse=True)
        if geo and not (shrinking and all(k <= m for k, m in zip(num_neighbor, [num_init_point, *num_sub_point]))):
            raise ValueError(f"region sampler: points {num_init_point} > {num_sub_point} and neighbors {num_neighbor} "
                             "must shrink stage by stage, each stage's neighbors no more than its points")
        self.geo, self.pooler, self.num_init_point = geo, pooler, num_init_point
        self.num_sub_point, self.num_neighbor = list(num_sub_point), list(num_neighbor)
        if geo:
            self.stages = nn.ModuleList(nn.ModuleDict(dict(relative=nn.Linear(dim + 2, dim + 2),
                                                           fuse=nn.Linear(2 * (dim + 2), dim), norm=nn.LayerNorm(dim)))
                                        for _ in num_sub_point)
            self.flatten = nn.Linear(num_sub_point[-1] * dim, dim)
        self.out = nn.Linear(dim, out_dim)

    def forward(self, feature_maps, masks):
        """feature_maps [R, C, h, w] (each region's image's), masks [R, H, W] bool -> [R, out_dim]."""
        xy = sample_points(masks, self.num_init_point)
        feats = features_at(feature_maps, xy).to(self.out.weight.dtype)
        if not self.geo:
            return self.out(feats.mean(1))
        for stage, n, k in zip(self.stages, self.num_sub_point, self.num_neighbor):
            centers = farthest_points(xy, n)  # [R, n]
            center_xy, center_f = take(xy, centers), take(feats, centers)
            near = torch.cdist(center_xy, xy).topk(k, largest=False).indices  # [R, n, k], itself included
            center = torch.cat([center_f, center_xy.to(feats.dtype)], -1).unsqueeze(2).expand(-1, -1, k, -1)
            # offsets subtracted in fp32: in bf16 a position near 1 is only good to 1/256, about an input pixel
            offsets = (take(xy, near) - center_xy.unsqueeze(2)).to(feats.dtype)
            relative = stage["relative"](torch.cat([take(feats, near) - center_f.unsqueeze(2), offsets], -1))
            x = stage["norm"](F.relu(stage["fuse"](torch.cat([relative, center], -1))))  # [R, n, k, dim]
            xy, feats = center_xy, (x.mean(2) if self.pooler == "mean" else x.amax(2))
        return self.out(self.flatten(feats.flatten(1)))

