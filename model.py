"""
The model: image -> VisionTower -> Projector -> into the LLM's input embeddings -> LLM -> loss.

The towers are Hugging Face models used as building blocks; each is given as a path or hub id (its
pretrained weights) or as a config dict with a `model_type` (random init, as the tiny default does).
Images enter the text as runs of `num_image_tokens` image-token ids (data.py expands `<image>`), so
the model only writes the projected patch features into the embeddings at those positions.

A checkpoint folder holds config.json (this model's config under "model") and model.safetensors;
`save` and `load` below read and write them and nothing else. With LoRA adapters (lora.py),
model.safetensors holds only what trains, and config.json names the folder of the frozen base. `save_hf_llava` and `from_hf_llava`
write and read the folder of transformers' LlavaForConditionalGeneration instead (export.py).
"""
import copy
import functools
import json
import math
import os
import re

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, load_model, save_file
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import lora

IGNORE_INDEX = -100
# Normalization of towers whose config dict does not say (a path's preprocessor_config.json does); others 0.5
IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
DEFAULT_MEAN_STD = {"clip_vision_model": ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]),
                    "dinov2": IMAGENET, "dinov2_with_registers": IMAGENET}


def hf_config(spec):
    """A config dict (with model_type) -> a transformers config."""
    spec = {k: v for k, v in spec.items() if k not in ("image_mean", "image_std", "transformers_version")}
    return AutoConfig.for_model(spec.pop("model_type"), **spec)


def read_mean_std(path):
    """image_mean/std from a pretrained folder's preprocessor_config.json (or, as transformers 5 writes
    it, the image_processor of processor_config.json), if it has one."""
    from transformers.utils import cached_file
    for name in ("preprocessor_config.json", "processor_config.json"):
        f = cached_file(path, name, _raise_exceptions_for_missing_entries=False)
        if f is not None:
            with open(f) as fh:
                cfg = json.load(fh)
            cfg = cfg.get("image_processor", cfg)
            if "image_mean" in cfg:
                return cfg["image_mean"], cfg.get("image_std")
    return None, None


class VisionTower(nn.Module):
    """Any Hugging Face vision encoder with patch outputs: a ViT (CLIP, SigLIP, DINOv2, ViT) or a conv net
    (ConvNeXt, ResNet), whose [C, h, w] feature map gives h*w tokens. select_layer picks the hidden state
    (LLaVA uses -2, the penultimate layer); select_feature is 'patch' (drop the tokens before the patches:
    CLIP's CLS, DINOv2's CLS and registers) or 'cls_patch' (keep the CLS token, if there is one).
    Frozen by default, as in LLaVA (no gradients, eval mode); train.py unfreezes it when asked."""

    def __init__(self, spec, select_layer=-2, select_feature="patch"):
        super().__init__()
        if isinstance(spec, dict):
            self.encoder = AutoModel.from_config(hf_config(spec))
            mean, std = spec.get("image_mean"), spec.get("image_std")
        else:  # a full CLIP/SigLIP checkpoint holds a text tower too: load only the vision part
            config = AutoConfig.from_pretrained(spec)
            self.encoder = AutoModel.from_pretrained(spec, config=getattr(config, "vision_config", config))
            mean, std = read_mean_std(spec)
        c = self.encoder.config
        default_mean, default_std = DEFAULT_MEAN_STD.get(c.model_type, ([0.5] * 3, [0.5] * 3))
        self.image_mean, self.image_std = mean or default_mean, std or default_std
        self.image_size = c.image_size
        if select_feature not in ("patch", "cls_patch"):
            raise ValueError(f"mm_vision_select_feature={select_feature!r}: use 'patch' or 'cls_patch'")
        self.select_layer, self.select_feature = select_layer, select_feature
        with torch.no_grad():  # the token count and width, whatever the architecture
            h = self.hidden_state(torch.zeros(1, 3, self.image_size, self.image_size))
        self.conv = h.dim() == 4  # a conv net's [N, C, h, w] feature map rather than a ViT's token sequence
        self.grid = tuple(h.shape[2:]) if self.conv else (self.image_size // c.patch_size,) * 2  # the patches' rows, columns
        self.num_patches = self.grid[0] * self.grid[1]
        # tokens before the patches: 0 (SigLIP, conv nets), 1 (CLS: CLIP, ViT), 1 + registers (DINOv2)
        self.num_prefix = 0 if self.conv else h.shape[1] - self.num_patches
        _, self.num_tokens, self.hidden_size = self.select(h).shape
        self.requires_grad_(False)
        self.eval()

    @property
    def trainable(self):
        return any(p.requires_grad for p in self.parameters())

    def train(self, mode=True):
        return super().train(mode and self.trainable)  # a frozen tower stays in eval mode (dropout, BatchNorm)

    def spec(self):
        """The config dict that rebuilds this tower (with random weights)."""
        return {**self.encoder.config.to_dict(), "image_mean": self.image_mean, "image_std": self.image_std}

    def freeze_unused(self):
        """Freeze the parameters that cannot reach the selected features (layers past select_layer, a
        pooling head): they would never get a gradient, and DDP insists that trainable ones do."""
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            return
        x = torch.zeros(1, 3, self.image_size, self.image_size, device=params[0].device, dtype=params[0].dtype)
        grads = torch.autograd.grad(self(x).sum(), params, allow_unused=True)
        for p, g in zip(params, grads):
            if g is None:
                p.requires_grad_(False)

    def hidden_state(self, pixel_values):
        return self.encoder(pixel_values=pixel_values, output_hidden_states=True).hidden_states[self.select_layer]

    def select(self, h):
        if h.dim() == 4:  # a conv net's [N, C, h, w] map: each cell is a patch
            return h.flatten(2).transpose(1, 2)
        if self.select_feature == "cls_patch" and self.num_prefix:
            return torch.cat([h[:, :1], h[:, self.num_prefix:]], 1)  # CLS first, registers dropped
        return h[:, self.num_prefix:]

    def forward(self, pixel_values):
        return self.select(self.hidden_state(pixel_values))

    def feature_map(self, features):
        """forward's [N, tokens, C] -> [N, C, rows, columns]: the patches where they sit in the image (a
        CLS token left out), for the region sampler."""
        patches = features[:, -self.num_patches:]
        return patches.transpose(1, 2).reshape(len(features), -1, *self.grid)


def build_projector(kind, d_in, d_out):
    """LLaVA's names: 'linear', 'mlp2x_gelu' (Linear, GELU, Linear), 'mlp3x_gelu', ..., and 'identity'
    (the features go in as they are: the tower's width must be the LLM's)."""
    if kind == "identity":
        if d_in != d_out:
            raise ValueError(f"mm_projector_type='identity' needs the image features' width ({d_in}) to equal the LLM's ({d_out})")
        return nn.Identity()
    if kind == "linear":
        return nn.Linear(d_in, d_out)
    m = re.fullmatch(r"mlp(\d+)x_gelu", kind)
    if not m:
        raise ValueError(f"mm_projector_type={kind!r}: use 'linear', 'mlp{{N}}x_gelu' or 'identity'")
    layers = [nn.Linear(d_in, d_out)]
    for _ in range(int(m[1]) - 1):
        layers += [nn.GELU(), nn.Linear(d_out, d_out)]
    return nn.Sequential(*layers)


def merge_patches(feats, k):
    """[N, h*w, C] -> [N, h*w/k^2, k^2*C]: each k x k block of neighbouring patches becomes one token
    (pixel shuffle, as in Idefics3), so the LLM reads k^2 times fewer image tokens."""
    if k == 1:
        return feats
    N, n, C = feats.shape
    h = int(n ** 0.5)
    if h * h != n or h % k:
        raise ValueError(f"mm_patch_merge={k} needs a square grid of patches divisible by {k}, got {n} patches")
    x = feats.reshape(N, h // k, k, h // k, k, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(N, (h // k) ** 2, k * k * C)


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
    body = sum(p.numel() for n, p in llm.named_parameters() if id(p) not in embeddings and p is not head and not lora.is_lora(n))
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


def load_projector(model, path):
    """Start from a trained projector (LLaVA's pretrain_mm_mlp_adapter: stage 2 from stage 1): a glimpse
    checkpoint folder (its trainable.safetensors, else model.safetensors) or out_dir (its newest), a .safetensors file, or LLaVA's
    mm_projector.bin (tensors only: torch.load with weights_only=True). The keys are those that end in
    mm_projector.<name>; names and shapes must fit this model's projector."""
    if os.path.isdir(path) and checkpoints(path):  # a run's out_dir: its newest checkpoint
        path = checkpoints(path)[-1]
    if os.path.isdir(path):  # what trained in that run alone if it was written, else the whole model
        trainable = os.path.join(path, "trainable.safetensors")
        path = trainable if os.path.exists(trainable) else os.path.join(path, "model.safetensors")
    try:
        state = load_file(path) if path.endswith(".safetensors") else torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RuntimeError(f"pretrain_mm_mlp_adapter={path}: cannot read it ({e})") from e
    weights = {k.split("mm_projector.", 1)[1]: v for k, v in state.items() if "mm_projector." in k}
    if not weights:
        raise ValueError(f"pretrain_mm_mlp_adapter={path}: it holds no mm_projector weights")
    try:
        model.mm_projector.load_state_dict(weights)
    except RuntimeError as e:
        raise ValueError(f"pretrain_mm_mlp_adapter={path} does not fit this model's projector: {e}") from e


def resize_embeddings(llm, vocab_size):
    """Grow the vocabulary to vocab_size; new rows start at the mean of the old ones (LLaVA's
    smart_tokenizer_and_embedding_resize), so a new token starts as an average word."""
    old = llm.get_input_embeddings().weight.shape[0]
    if vocab_size <= old:
        return
    llm.resize_token_embeddings(vocab_size, mean_resizing=False)
    with torch.no_grad():
        for emb in {llm.get_input_embeddings(), llm.get_output_embeddings()} - {None}:
            emb.weight[old:] = emb.weight[:old].mean(0)


def lm_head(llm, hidden):
    """The LLM's output layer on some hidden states, with the scaling that a few families apply to its
    logits in their own forward (which VLM.forward skips so as to run the head on labelled positions only)."""
    logits = llm.get_output_embeddings()(hidden)
    c = llm.config
    if getattr(c, "logit_scale", None):  # Cohere
        logits = logits * c.logit_scale
    if getattr(c, "logits_scaling", None):  # Granite
        logits = logits / c.logits_scaling
    if getattr(c, "final_logit_softcapping", None):  # Gemma 2 and 3
        logits = torch.tanh(logits / c.final_logit_softcapping) * c.final_logit_softcapping
    return logits


@torch.no_grad()
def check_lm_head(llm):
    """lm_head must give the logits of the LLM's own forward: a family that changes them in a way lm_head
    does not know (FalconH1's lm_head_multiplier, say) would be trained on other logits than it generates
    with. One forward of three tokens tells."""
    was_training = llm.training
    ids = torch.tensor([[1, 2, 3]], device=llm.device)
    ref = llm.eval()(input_ids=ids).logits
    got = lm_head(llm, llm.base_model(input_ids=ids).last_hidden_state)
    llm.train(was_training)
    if not torch.allclose(got.float(), ref.float(), rtol=1e-3, atol=1e-3):
        raise ValueError(f"{llm.config.model_type}: its forward changes the logits in a way model.lm_head does not "
                         f"know (max difference {(got - ref).abs().max():.3g}): add that family's scaling to lm_head")


# regions (Ferret) ---------------------------------------------------------------------------------------

def sample_points(masks, n):
    """n points inside each mask [R, H, W] -> [R, n, 2], (x, y) in [0, 1] at pixel centers: every pixel of
    the mask once, in random order, when it has n or more; else all of them and random repeats."""
    out = []
    for m in masks:
        ys, xs = torch.nonzero(m, as_tuple=True)
        if len(xs) == 0:
            raise ValueError("an empty region mask")
        pick = torch.randperm(len(xs), device=m.device)[:n]
        if len(xs) < n:
            pick = torch.cat([pick, torch.randint(len(xs), (n - len(xs),), device=m.device)])
        out.append(torch.stack([(xs[pick] + 0.5) / m.shape[1], (ys[pick] + 0.5) / m.shape[0]], -1))
    return torch.stack(out)


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
    LLM's width. geo=False is the simple option: the mean of the features at the points, projected."""

    def __init__(self, dim, out_dim, geo=True, num_init_point=512, num_sub_point=(128, 32), num_neighbor=(24, 24),
                 pooler="mean"):
        super().__init__()
        if pooler not in ("mean", "max"):
            raise ValueError(f"sampler_pooler_mode={pooler!r}: use 'mean' or 'max'")
        if geo and not (num_init_point >= num_sub_point[0] and list(num_sub_point) == sorted(num_sub_point, reverse=True)
                        and all(k <= m for k, m in zip(num_neighbor, [num_init_point, *num_sub_point]))):
            raise ValueError(f"region sampler: points {num_init_point} > {num_sub_point} and neighbors {num_neighbor} "
                             "must shrink stage by stage, each stage's neighbors no more than its points")
        self.geo, self.pooler, self.num_init_point = geo, pooler, num_init_point
        self.num_sub_point, self.num_neighbor = list(num_sub_point), list(num_neighbor)
        if geo:
            self.stages = nn.ModuleList(nn.ModuleDict(dict(relative=nn.Linear(dim + 2, dim + 2), fuse=nn.Linear(2 * (dim + 2), dim),
                                                           norm=nn.LayerNorm(dim))) for _ in num_sub_point)
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


class VLM(nn.Module):
    """config: vision_tower, model_name_or_path (each a path or a config dict), mm_vision_select_layer,
    mm_vision_select_feature, mm_patch_merge, mm_projector_type, image_token_id, vocab_size (of the tokenizer);
    for Ferret's regions, add_region_feature, region_token_id and the region sampler's settings
    (region_geo_sampler, sampler_pooler_mode, sampler_num_init_point, sampler_num_sub_point, sampler_num_neighbor)."""

    def __init__(self, config):
        super().__init__()
        self.vision_tower = VisionTower(config["vision_tower"], config["mm_vision_select_layer"],
                                        config["mm_vision_select_feature"])
        llm = config["model_name_or_path"]
        if isinstance(llm, dict):  # a random init sized to the tokenizer, unless the dict says otherwise
            self.llm = AutoModelForCausalLM.from_config(hf_config({"vocab_size": config["vocab_size"], **llm}))
        else:
            self.llm = AutoModelForCausalLM.from_pretrained(llm, dtype=torch.float32)
        resize_embeddings(self.llm, config["vocab_size"])
        check_lm_head(self.llm)
        self.patch_merge = config.get("mm_patch_merge", 1)
        self.mm_projector = build_projector(config["mm_projector_type"], self.vision_tower.hidden_size * self.patch_merge ** 2,
                                            self.llm.config.hidden_size)
        self.image_token_id = config["image_token_id"]
        self.num_image_tokens = self.vision_tower.num_tokens // self.patch_merge ** 2
        self.region_sampler, self.region_token_id = None, config.get("region_token_id")
        if config.get("add_region_feature"):  # it reads the tower's own features, before the projector (as Ferret)
            self.region_sampler = RegionSampler(
                self.vision_tower.hidden_size, self.llm.config.hidden_size, config.get("region_geo_sampler", True),
                config.get("sampler_num_init_point", 512), config.get("sampler_num_sub_point", (128, 32)),
                config.get("sampler_num_neighbor", (24, 24)), config.get("sampler_pooler_mode", "mean"))
        # what rebuilds this model from scratch, before its weights are loaded
        self.config = {**config, "vision_tower": self.vision_tower.spec(), "model_name_or_path": self.llm.config.to_dict(),
                       "vocab_size": self.llm.get_input_embeddings().weight.shape[0]}

    def encode_images(self, pixel_values):
        """[N, 3, H, W] -> (the tower's features [N, tokens, C], projected [N, num_image_tokens, llm width]).
        A frozen tower builds no autograd graph."""
        tower = self.vision_tower
        with torch.set_grad_enabled(tower.trainable and torch.is_grad_enabled()):
            feats = tower(pixel_values.to(next(tower.parameters()).dtype))
        merged = merge_patches(feats, self.patch_merge)
        return feats, self.mm_projector(merged.to(next(self.mm_projector.parameters(), merged).dtype))  # identity: no parameters

    def embed(self, input_ids, pixel_values=None, region_masks=None, region_image=None):
        """Token embeddings with the image features written over the image tokens, and each region's
        (the region sampler's, from its image's feature map: region_masks [R, H, W], region_image [R] the
        index of its image in pixel_values) over its <region_fea> token, in order.

        A batch without images (or regions) still runs their path, on a blank image (a whole-image region),
        times 0: the loss gains exactly 0, but every trainable parameter is in the graph with a zero gradient,
        as DDP and FSDP expect the same parameters to take part on every rank (and as one process must too,
        to take the same optimizer steps: AdamW moves a parameter with a zero gradient, not one without);
        and under FSDP every rank gathers the tower's weights, in eval too."""
        emb = self.llm.get_input_embeddings()(input_ids)
        is_image = input_ids == self.image_token_id
        is_region = input_ids == self.region_token_id if self.region_sampler is not None else torch.zeros_like(is_image)
        n_images, n_regions = int(is_image.sum()), int(is_region.sum())
        if n_regions != (0 if region_masks is None else len(region_masks)):
            raise ValueError(f"the batch has {n_regions} region tokens but {0 if region_masks is None else len(region_masks)} region masks")
        stand_in = torch.distributed.is_initialized() or \
            (torch.is_grad_enabled() and any(p.requires_grad for p in self.mm_projector.parameters()))
        if pixel_values is None or len(pixel_values) == 0:
            if n_images or n_regions:
                raise ValueError(f"the batch has {n_images} image tokens and {n_regions} region tokens but no pixel_values")
            if not stand_in:
                return emb
            size = self.vision_tower.image_size
            pixel_values = emb.new_zeros(1, 3, size, size)
        tower_feats, feats = self.encode_images(pixel_values)
        if not n_images:
            emb = emb + 0 * feats.sum().to(emb.dtype)
        elif n_images != feats.shape[0] * feats.shape[1]:
            raise ValueError(f"the batch has {n_images} image tokens, but {feats.shape[0]} images x {feats.shape[1]} "
                             f"tokens each = {feats.shape[0] * feats.shape[1]}")
        else:
            emb = emb.masked_scatter(is_image.unsqueeze(-1), feats.to(emb.dtype))
        if self.region_sampler is None or not (n_regions or stand_in):
            return emb
        if not n_regions:
            region_masks = torch.ones(1, *pixel_values.shape[2:], dtype=torch.bool, device=emb.device)
            region_image = torch.zeros(1, dtype=torch.long, device=emb.device)
        regions = self.region_sampler(self.vision_tower.feature_map(tower_feats)[region_image], region_masks)
        if not n_regions:
            return emb + 0 * regions.sum().to(emb.dtype)
        return emb.masked_scatter(is_region.unsqueeze(-1), regions.to(emb.dtype))

    def forward(self, batch):
        """Mean cross-entropy over the labelled tokens. The LM head runs on those positions only, so
        the [B, T, vocab] logits of prompts and images are never made."""
        emb = self.embed(batch["input_ids"], batch.get("pixel_values"), batch.get("region_masks"), batch.get("region_image"))
        out = self.llm.base_model(inputs_embeds=emb, attention_mask=batch.get("attention_mask"),
                                  position_ids=batch.get("position_ids"), use_cache=False)
        labels = batch["labels"][:, 1:]
        keep = labels != IGNORE_INDEX
        logits = lm_head(self.llm, out.last_hidden_state[:, :-1][keep])
        # 0, not NaN, for a batch with nothing to train (a stand-in for an empty micro-batch, data.py)
        return F.cross_entropy(logits.float(), labels[keep], reduction="sum") / keep.sum().clamp(min=1)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, pixel_values=None, max_new_tokens=64, temperature=0.0,
                 top_p=1.0, stop_token_ids=(), generator=None, stop=None, region_masks=None, region_image=None):
        """Prompts left-padded in a batch -> [B, <=max_new_tokens] new tokens (with a KV cache).
        temperature 0 is greedy; otherwise sample from the top_p nucleus. A row stops at any of
        stop_token_ids (e.g. EOS) or where stop(new tokens so far [B, t]) -> bool [B] says so (sample.py
        looks for the template's stop string in their text); a finished row repeats its last token."""
        emb = self.embed(input_ids, pixel_values, region_masks, region_image)
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        out = self.llm(inputs_embeds=emb, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=True, logits_to_keep=1)
        stop_ids = torch.tensor(list(stop_token_ids), dtype=torch.long, device=input_ids.device)
        done = torch.zeros(len(input_ids), dtype=torch.bool, device=input_ids.device)
        last = torch.zeros_like(done, dtype=torch.long)
        new = []
        for _ in range(max_new_tokens):
            tok = sample_next(out.logits[:, -1].float(), temperature, top_p, generator)
            tok = torch.where(done, last, tok)
            new.append(tok)
            done |= torch.isin(tok, stop_ids)
            if stop is not None:
                done |= stop(torch.stack(new, 1)).to(done.device)
            last = tok
            if done.all():
                break
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(tok), 1)], 1)
            position_ids = position_ids[:, -1:] + 1
            out = self.llm(input_ids=tok[:, None], attention_mask=attention_mask, position_ids=position_ids,
                           past_key_values=out.past_key_values, use_cache=True)
        return torch.stack(new, 1)


def sample_next(logits, temperature, top_p, generator=None):
    if temperature <= 0:
        return logits.argmax(-1)
    probs = F.softmax(logits / temperature, -1)
    sorted_p, order = probs.sort(-1, descending=True)
    outside = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest set whose mass reaches top_p
    sorted_p[outside] = 0
    choice = torch.multinomial(sorted_p, 1, generator=generator)
    return order.gather(-1, choice).squeeze(-1)


# Hugging Face LLaVA ----------------------------------------------------------------------------------
# transformers' LlavaForConditionalGeneration is this model with fewer choices: a ViT tower read at
# hidden_states[vision_feature_layer] with or without its first token, a Linear-act-Linear projector,
# and the LLM as a base model plus a bare lm_head. A model within those choices exports; so does one
# with a linear projector (as Linear, identity, identity Linear). vLLM and others load the same folder.

def hf_llava_config(model):
    """The LlavaConfig of this model, or a ValueError that lists what Llava cannot represent."""
    from transformers import LlavaConfig
    c, tower, llm = model.config, model.vision_tower, model.llm
    problems = []
    if getattr(model, "region_sampler", None) is not None or c.get("region_sampler") or c.get("add_region_feature"):
        problems.append("it has a region sampler (Ferret), which Llava does not")
    if tower.conv:
        problems.append(f"its tower ({tower.encoder.config.model_type}) is a conv net: Llava reads a ViT's token sequence")
    elif tower.num_prefix > 1:
        problems.append(f"its tower has {tower.num_prefix - 1} register tokens, which Llava would keep as image tokens")
    if model.patch_merge != 1:
        problems.append(f"mm_patch_merge={model.patch_merge}: Llava does not merge patches")
    if c["mm_projector_type"] not in ("linear", "mlp2x_gelu"):
        problems.append(f"mm_projector_type={c['mm_projector_type']!r}: Llava's projector is 'mlp2x_gelu' (or 'linear')")
    for key, neutral in (("final_logit_softcapping", None), ("logit_scale", None), ("logits_scaling", 1.0)):
        if getattr(llm.config, key, None) not in (None, neutral):
            problems.append(f"its LLM sets {key}={getattr(llm.config, key)}, which Llava's plain lm_head would skip")
    if problems:
        raise ValueError("cannot export to transformers' LlavaForConditionalGeneration: " + "; ".join(problems))
    text_config = copy.deepcopy(llm.config)
    # Llava ties lm_head to `embed_tokens`, a name GPT-2 and OPT do not use: those export untied
    text_config.tie_word_embeddings = bool(getattr(llm.config, "tie_word_embeddings", False)) and \
        hasattr(llm.base_model, "embed_tokens")
    drop_cls = tower.num_prefix == 1 and tower.select_feature == "patch"
    return LlavaConfig(vision_config=copy.deepcopy(tower.encoder.config), text_config=text_config,
                       image_token_index=model.image_token_id, image_seq_length=model.num_image_tokens,
                       vision_feature_layer=tower.select_layer,
                       vision_feature_select_strategy="default" if drop_cls else "full",  # 'default' drops the first token
                       projector_hidden_act="linear" if c["mm_projector_type"] == "linear" else "gelu",
                       multimodal_projector_bias=True, tie_word_embeddings=text_config.tie_word_embeddings)


def save_hf_llava(model, path):
    """Write config.json and model.safetensors of a LlavaForConditionalGeneration whose parts are this
    model's parts (shared, not copied); transformers saves them under the names it loads."""
    from transformers import LlavaForConditionalGeneration
    config = hf_llava_config(model)
    with torch.device("meta"):  # an empty shell: every part with weights is replaced below
        hf = LlavaForConditionalGeneration(config)
    hf.model.vision_tower, hf.model.language_model = model.vision_tower.encoder, model.llm.base_model
    head = model.llm.get_output_embeddings()
    tied_here = head.weight is model.llm.get_input_embeddings().weight
    hf.lm_head = copy.deepcopy(head) if tied_here and not config.tie_word_embeddings else head  # untied: its own copy
    proj = hf.model.multi_modal_projector
    if isinstance(model.mm_projector, nn.Linear):
        w = model.mm_projector.weight
        proj.linear_1, proj.act = model.mm_projector, nn.Identity()
        proj.linear_2 = nn.Linear(len(w), len(w), device=w.device, dtype=w.dtype)
        with torch.no_grad():
            proj.linear_2.weight.copy_(torch.eye(len(w))), proj.linear_2.bias.zero_()
    else:
        proj.linear_1, proj.linear_2 = model.mm_projector[0], model.mm_projector[2]
    hf.save_pretrained(path)
    return config


def from_hf_llava(path):
    """A VLM from a transformers LLaVA folder (what export.py writes, or e.g. llava-hf/llava-1.5-7b-hf
    downloaded). Both models are in memory while the weights are copied."""
    from transformers import LlavaForConditionalGeneration
    hf = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    c = hf.config
    if not isinstance(c.vision_feature_layer, int) or c.projector_hidden_act not in ("gelu", "linear") or \
            not c.multimodal_projector_bias:
        raise ValueError(f"{path}: vision_feature_layer={c.vision_feature_layer}, projector_hidden_act="
                         f"{c.projector_hidden_act}, multimodal_projector_bias={c.multimodal_projector_bias}: glimpse "
                         "reads one layer through a Linear-GELU-Linear projector with biases (or a linear one)")
    v = c.vision_config
    with torch.no_grad():  # how many tokens come before the patches (CLS, registers)?
        x = torch.zeros(1, 3, v.image_size, v.image_size)
        n = hf.model.vision_tower(x, output_hidden_states=True).hidden_states[c.vision_feature_layer].shape[1]
    prefix = n - (v.image_size // v.patch_size) ** 2
    if prefix > 1 or (prefix == 0 and c.vision_feature_select_strategy == "default"):
        raise ValueError(f"{path}: vision_feature_select_strategy={c.vision_feature_select_strategy!r} with "
                         f"{prefix} tokens before the patches is not one of glimpse's selections")
    mean, std = read_mean_std(path)
    model = VLM(dict(vision_tower={**v.to_dict(), "image_mean": mean, "image_std": std},
                     model_name_or_path=c.text_config.to_dict(), mm_vision_select_layer=c.vision_feature_layer,
                     mm_vision_select_feature="cls_patch" if prefix and c.vision_feature_select_strategy == "full" else "patch",
                     mm_projector_type="linear" if c.projector_hidden_act == "linear" else "mlp2x_gelu",
                     image_token_id=c.image_token_index, vocab_size=c.text_config.vocab_size))
    proj = hf.model.multi_modal_projector
    with torch.no_grad():
        model.vision_tower.encoder.load_state_dict(hf.model.vision_tower.state_dict())
        model.llm.base_model.load_state_dict(hf.model.language_model.state_dict())
        model.llm.get_output_embeddings().load_state_dict(hf.lm_head.state_dict())
        if c.projector_hidden_act == "linear":  # Linear, identity, Linear: one Linear
            model.mm_projector.weight.copy_(proj.linear_2.weight @ proj.linear_1.weight)
            model.mm_projector.bias.copy_(proj.linear_2(proj.linear_1.bias))
        else:
            model.mm_projector[0].load_state_dict(proj.linear_1.state_dict())
            model.mm_projector[2].load_state_dict(proj.linear_2.state_dict())
    return model


def is_hf_llava(path):
    cfg = os.path.join(path, "config.json")
    if not os.path.exists(cfg):
        return False
    with open(cfg) as f:
        return json.load(f).get("model_type") == "llava"


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
        json.dump({"model": model.config, **({"lora": adapters} if adapters else {}), **(extra_config or {})}, f, indent=1)
    save_file(state, os.path.join(path, "model.safetensors"))


def checkpoints(out_dir):
    """The complete checkpoints in out_dir, oldest first (a .tmp folder is one that was cut short)."""
    if not os.path.isdir(out_dir):
        return []
    return [os.path.join(out_dir, n) for n in sorted(os.listdir(out_dir)) if n.startswith("ckpt-") and not n.endswith(".tmp")]


def load(path, device="cpu"):
    """Rebuild a VLM from config.json (random init) and load model.safetensors into it. A transformers
    LLaVA folder loads too (its config comes back under "hf_llava")."""
    if is_hf_llava(path):
        model = from_hf_llava(path)
        return model.to(device), {"model": model.config, "hf_llava": str(path)}
    cfg_file, weights = os.path.join(path, "config.json"), os.path.join(path, "model.safetensors")
    for f in (cfg_file, weights):
        if not os.path.exists(f):
            raise FileNotFoundError(f"{f}: not a glimpse checkpoint (missing {os.path.basename(f)})")
    with open(cfg_file) as f:
        config = json.load(f)
    if "lora" in config:  # the frozen base from its folder, then the adapters and what else trained
        return load_lora(path, config, device), config
    model = VLM(config["model"])
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
    model.lora_base = c["base"]
    return model
