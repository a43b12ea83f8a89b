"""
The model: image -> VisionTower -> projector -> into the LLM's input embeddings -> LLM -> loss (LLaVA's
LlavaMetaModel and LlavaLlamaForCausalLM in one class, for any LLM).

The towers are Hugging Face models used as building blocks; each is given as a path or hub id (its
pretrained weights) or as a config dict with a `model_type` (random init, as the tiny default does).
Images enter the text as runs of `num_image_tokens` image-token ids (data.py expands `<image>`), so
the model only writes the projected patch features into the embeddings at those positions (what LLaVA's
prepare_inputs_labels_for_multimodal does by splicing). VLMConfig holds every setting of the model, once.
This file knows nothing of files and chat templates: checkpoint.py saves and loads a VLM, hf_llava.py
converts it to and from transformers' LlavaForConditionalGeneration.
"""
import inspect
import json
import re
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, DynamicCache

import ferret  # Ferret
from conversation import IGNORE_INDEX

# Normalization of towers whose config dict does not say (a path's preprocessor_config.json does); others 0.5
IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
DEFAULT_MEAN_STD = {"clip_vision_model": ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]),
                    "dinov2": IMAGENET, "dinov2_with_registers": IMAGENET}


@dataclass
class VLMConfig:
    """The model's settings (LLaVA's ModelArguments), each also a config key of train.py, with the defaults
    of its tiny shapes model. A checkpoint's config.json holds them under "model", with the towers written
    out as config dicts, so that it rebuilds without the folders it came from."""
    # the LLM: a path / hub id, or a config dict for a random init (sized to the tokenizer unless it says); the
    # default's init is wider than transformers' 0.02, which kept the lookup of a color by shape on a plateau
    model_name_or_path: str | dict = field(default_factory=lambda: dict(
        model_type="llama", hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=True, initializer_range=0.09))
    # the vision tower, the same. The default is a small ConvNeXt with a stride-2 stem: from scratch, a patchify
    # stem (a ViT's, or ConvNeXt's usual 4x4) did not learn shapes in the time a CPU has (BENCHMARKS.md); its
    # 6x6 map gives 36 image tokens
    vision_tower: str | dict = field(default_factory=lambda: dict(
        model_type="convnext", image_size=48, patch_size=2, num_stages=3, hidden_sizes=[32, 64, 128], depths=[1, 1, 1],
        layer_scale_init_value=1.0))
    mm_vision_select_layer: int = -1  # hidden state fed to the projector (LLaVA: -2, the penultimate)
    mm_vision_select_feature: str = "patch"  # 'patch' or 'cls_patch' (keep the CLS token)
    mm_patch_merge: int = 1  # k: each k x k block of patches becomes one image token (k^2 fewer tokens)
    mm_projector_type: str = "mlp2x_gelu"  # 'linear', 'mlp{N}x_gelu' or 'identity'
    # Ferret: a <region_fea> token per region, filled by the region sampler (ferret.RegionSampler)
    add_region_feature: bool = False
    region_geo_sampler: bool = True  # Ferret's spatial-aware sampler; False: the mean of the features in the region
    sampler_pooler_mode: str = "mean"  # 'mean' or 'max' over each point's neighbors
    sampler_num_init_point: int = 512  # points drawn inside a region
    sampler_num_sub_point: tuple = (128, 32)  # points each stage keeps (farthest point sampling)
    sampler_num_neighbor: tuple = (24, 24)  # neighbors each stage's points pool
    # from the tokenizer, not config keys: train.py sets them
    vocab_size: int | None = None
    image_token_id: int | None = None
    region_token_id: int | None = None  # Ferret


TOKENIZER_FIELDS = ("vocab_size", "image_token_id", "region_token_id")  # VLMConfig's that the tokenizer gives


def on_meta():
    """Whether new tensors are made on the meta device here: train.py's ranks other than 0 build the model in
    `with torch.device("meta")`, its shapes without its weights (they come from rank 0), so that a model
    larger than host memory / ranks still fits."""
    return torch.empty(0).is_meta


def hf_config(spec):
    """A config dict (with model_type) -> a transformers config."""
    # a random init is fp32 whatever dtype the dict was saved from (train.py casts what it keeps in bf16)
    spec = {k: v for k, v in spec.items() if k not in ("image_mean", "image_std", "transformers_version", "dtype",
                                                        "torch_dtype")}
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
            config = getattr(config, "vision_config", config)
            self.encoder = AutoModel.from_config(config, dtype=torch.float32) if on_meta() else \
                AutoModel.from_pretrained(spec, config=config, dtype=torch.float32)
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
        # the patches' rows and columns
        self.grid = tuple(h.shape[2:]) if self.conv else (self.image_size // c.patch_size,) * 2
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
            raise ValueError(f"mm_projector_type='identity' needs the image features' width ({d_in}) to equal the "
                             f"LLM's ({d_out})")
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
    with. One forward of three tokens tells (not on the meta device: it has no numbers to compare)."""
    if llm.device.type == "meta":
        return
    was_training = llm.training
    ids = torch.tensor([[1, 2, 3]], device=llm.device)
    ref = llm.eval()(input_ids=ids).logits
    got = lm_head(llm, llm.base_model(input_ids=ids).last_hidden_state)
    llm.train(was_training)
    if not torch.allclose(got.float(), ref.float(), rtol=1e-3, atol=1e-3):
        raise ValueError(f"{llm.config.model_type}: its forward changes the logits in a way model.lm_head does not "
                         f"know (max difference {(got - ref).abs().max():.3g}): add that family's scaling to lm_head")


@torch.no_grad()
def check_packing(llm):
    """Packing (data.collate) needs the LLM to keep each packed record's attention within it, told only by
    position_ids that restart at 0 (transformers builds that mask when it gets no attention mask; a family or
    an attn_implementation that does not would let a record read the one before it, and train on that
    silently). One forward of two rows, as collate makes them: two short records packed, and the second alone,
    tells (on more than one row: a kernel may honour packing in a batch of one row only)."""
    was_training = llm.training
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7], [4, 5, 6, 7, 0, 0, 0]], device=llm.device)
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6]], device=llm.device)
    out = llm.eval().base_model(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state
    packed, alone = out[0, 3:], out[1, :4]
    llm.train(was_training)
    if not torch.allclose(packed.float(), alone.float(), rtol=1e-3, atol=1e-3):
        raise ValueError(f"packing=True: {llm.config.model_type} with attn_implementation="
                         f"{llm.config._attn_implementation!r} lets a packed record attend to the one before it (max "
                         f"difference {(packed - alone).abs().max():.3g}): use packing=False or another "
                         "attn_implementation")


def cache_keyword(llm):
    """The keyword by which the LLM's forward takes a KV cache: `cache`, the name since transformers 5.x, which
    warns on past_key_values and will drop it in 5.40 (from then on it would be ignored, silently: a token decoded
    without its context); past_key_values only for a family, or a transformers, whose forward has no `cache`."""
    params = inspect.signature(llm.forward).parameters  # through the deprecation wrapper, to the forward itself
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise ValueError(f"{type(llm).__name__}.forward takes no KV cache (neither `cache` nor `past_key_values`)")


class VLM(nn.Module):
    """The vision tower, the projector and the LLM (with Ferret's region sampler when
    config.add_region_feature), built from a VLMConfig."""

    def __init__(self, config):
        super().__init__()
        if config.image_token_id is None or config.vocab_size is None:
            raise ValueError("VLMConfig needs the tokenizer's vocab_size and image_token_id (train.py sets them)")
        self.vision_tower = VisionTower(config.vision_tower, config.mm_vision_select_layer,
                                        config.mm_vision_select_feature)
        llm = config.model_name_or_path
        if isinstance(llm, dict):  # a random init sized to the tokenizer, unless the dict says otherwise
            self.llm = AutoModelForCausalLM.from_config(hf_config({"vocab_size": config.vocab_size, **llm}))
        elif on_meta():  # its architecture: the weights come from rank 0
            self.llm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(llm), dtype=torch.float32)
        else:
            self.llm = AutoModelForCausalLM.from_pretrained(llm, dtype=torch.float32)
        resize_embeddings(self.llm, config.vocab_size)
        check_lm_head(self.llm)
        self.patch_merge = config.mm_patch_merge
        self.mm_projector = build_projector(config.mm_projector_type,
                                            self.vision_tower.hidden_size * self.patch_merge ** 2,
                                            self.llm.config.hidden_size)
        self.image_token_id = config.image_token_id
        self.num_image_tokens = self.vision_tower.num_tokens // self.patch_merge ** 2
        self.region_sampler, self.region_token_id = None, config.region_token_id
        if config.add_region_feature:  # Ferret: it reads the tower's own features, before the projector
            self.region_sampler = ferret.RegionSampler(
                self.vision_tower.hidden_size, self.llm.config.hidden_size, config.region_geo_sampler,
                config.sampler_num_init_point, config.sampler_num_sub_point, config.sampler_num_neighbor,
                config.sampler_pooler_mode)
        # what rebuilds this model from scratch, before its weights are loaded
        self.config = replace(config, vision_tower=self.vision_tower.spec(),
                              model_name_or_path=self.llm.config.to_dict(),
                              vocab_size=self.llm.get_input_embeddings().weight.shape[0])

    def encode_images(self, pixel_values):
        """[N, 3, H, W] -> (the tower's features [N, tokens, C], projected [N, num_image_tokens, llm width]).
        A frozen tower builds no autograd graph."""
        tower = self.vision_tower
        with torch.set_grad_enabled(tower.trainable and torch.is_grad_enabled()):
            feats = tower(pixel_values.to(next(tower.parameters()).dtype))
        merged = merge_patches(feats, self.patch_merge)
        dtype = next(self.mm_projector.parameters(), merged).dtype  # an identity projector has no parameters
        return feats, self.mm_projector(merged.to(dtype))

    def embed(self, input_ids, pixel_values=None, region_masks=None, region_image=None, image_positions=None,
              region_positions=None):
        """LLaVA's prepare_inputs_labels_for_multimodal, without the splicing: token embeddings with the
        image features written over the image tokens, and each region's
        (the region sampler's, from its image's feature map: region_masks [R, H, W], region_image [R] the
        index of its image in pixel_values) over its <region_fea> token, in order. image_positions and
        region_positions, the tokens' flat indices in input_ids, come from collate (found on the CPU); without
        them they are found here.

        A batch without images (or regions) still runs their path, on a blank image (a whole-image region),
        times 0: the loss gains exactly 0, but every trainable parameter is in the graph with a zero gradient,
        as DDP and FSDP expect the same parameters to take part on every rank (and as one process must too,
        to take the same optimizer steps: AdamW moves a parameter with a zero gradient, not one without);
        and under FSDP every rank gathers the tower's weights, in eval too."""
        emb = self.llm.get_input_embeddings()(input_ids)
        if image_positions is None:
            image_positions = torch.nonzero(input_ids.flatten() == self.image_token_id).flatten()
        if region_positions is None:
            region_positions = torch.nonzero(input_ids.flatten() == self.region_token_id).flatten() \
                if self.region_sampler is not None else image_positions[:0]
        # the counts are the tensors' sizes, known without waiting for the device
        n_images, n_regions = len(image_positions), len(region_positions)
        n_masks = 0 if region_masks is None else len(region_masks)
        if n_regions != n_masks:
            raise ValueError(f"the batch has {n_regions} region tokens but {n_masks} region masks")
        stand_in = torch.distributed.is_initialized() or \
            (torch.is_grad_enabled() and any(p.requires_grad for p in self.mm_projector.parameters()))
        if pixel_values is None or len(pixel_values) == 0:
            if n_images or n_regions:
                raise ValueError(f"the batch has {n_images} image tokens and {n_regions} region tokens but no "
                                 "pixel_values")
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
            emb = write_at(emb, image_positions, feats)
        # Ferret: each region's features over its <region_fea> token (without Ferret, emb is the embedding)
        if self.region_sampler is None or not (n_regions or stand_in):
            return emb
        if not n_regions:
            region_masks = torch.ones(1, *pixel_values.shape[2:], dtype=torch.bool, device=emb.device)
            region_image = torch.zeros(1, dtype=torch.long, device=emb.device)
        regions = self.region_sampler(self.vision_tower.feature_map(tower_feats)[region_image], region_masks)
        if not n_regions:
            return emb + 0 * regions.sum().to(emb.dtype)
        return write_at(emb, region_positions, regions)

    def forward(self, batch):
        """Mean cross-entropy over the labelled tokens. The LM head runs on those positions only, so
        the [B, T, vocab] logits of prompts and images are never made. No attention mask goes to the LLM:
        right padding comes after every real token, so a causal mask already keeps it out of their attention,
        and without one SDPA may take its flash kernel; packed rows (data.collate) get per-record attention
        from their position_ids."""
        emb = self.embed(batch["input_ids"], batch.get("pixel_values"), batch.get("region_masks"),
                         batch.get("region_image"), batch.get("image_positions"), batch.get("region_positions"))
        out = self.llm.base_model(inputs_embeds=emb, position_ids=batch.get("position_ids"), use_cache=False)
        positions = batch.get("loss_positions")  # of the hidden states whose next token trains
        if positions is None:
            keep = batch["labels"].roll(-1, 1) != IGNORE_INDEX
            keep[:, -1] = False
            positions = torch.nonzero(keep.flatten()).flatten()
        hidden = out.last_hidden_state.flatten(0, 1)
        logits = lm_head(self.llm, hidden.index_select(0, positions))
        targets = batch["labels"].flatten().index_select(0, positions + 1)
        # 0, not NaN, for a batch with nothing to train (a stand-in for an empty micro-batch, data.py)
        return F.cross_entropy(logits.float(), targets, reduction="sum") / max(len(positions), 1)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, pixel_values=None, max_new_tokens=64, temperature=0.0,
                 top_p=1.0, stop_token_ids=(), generator=None, stop=None, region_masks=None, region_image=None):
        """Prompts left-padded in a batch -> [B, <=max_new_tokens] new tokens (with a KV cache).
        temperature 0 is greedy; otherwise sample from the top_p nucleus. A row stops at any of
        stop_token_ids (e.g. EOS) or where stop(new tokens so far [B, t]) -> bool [B] says so (sample.py
        looks for the template's stop string in their text); a finished row repeats its last token."""
        emb = self.embed(input_ids, pixel_values, region_masks, region_image)
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        # our own cache, filled in place by each forward: nothing is read back from the outputs, whose field
        # for it was renamed too (past_key_values -> cache). From the config, for its layer kinds (Gemma 2's
        # sliding window)
        cache = {cache_keyword(self.llm): DynamicCache(config=self.llm.config)}
        out = self.llm(inputs_embeds=emb, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=True, logits_to_keep=1, **cache)
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
                           use_cache=True, **cache)
        return torch.stack(new, 1)


def write_at(emb, positions, values):
    """emb [B, T, D] with values [..., D] written at the flat positions (of B * T), in order: an index_copy,
    which unlike masked_scatter needs no prefix sum over B * T * D, nor a nonzero in backward."""
    flat = emb.flatten(0, 1).index_copy(0, positions, values.reshape(-1, emb.shape[-1]).to(emb.dtype))
    return flat.view_as(emb)


def sample_next(logits, temperature, top_p, generator=None):
    if temperature <= 0:
        return logits.argmax(-1)
    probs = F.softmax(logits / temperature, -1)
    sorted_p, order = probs.sort(-1, descending=True)
    outside = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest set whose mass reaches top_p
    sorted_p[outside] = 0
    choice = torch.multinomial(sorted_p, 1, generator=generator)
    return order.gather(-1, choice).squeeze(-1)

