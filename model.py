"""
The model: image -> VisionTower -> Projector -> into the LLM's input embeddings -> LLM -> loss.

The towers are Hugging Face models used as building blocks; each is given as a path or hub id (its
pretrained weights) or as a config dict with a `model_type` (random init, as the tiny default does).
Images enter the text as runs of `num_image_tokens` image-token ids (data.py expands `<image>`), so
the model only writes the projected patch features into the embeddings at those positions.

A checkpoint folder holds config.json (this model's config under "model") and model.safetensors;
`save` and `load` below read and write them and nothing else.
"""
import json
import os
import re

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_model, save_model
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

IGNORE_INDEX = -100
# Normalization of towers whose config dict does not say (a path's preprocessor_config.json does)
DEFAULT_MEAN_STD = {"clip_vision_model": ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711])}


def hf_config(spec):
    """A config dict (with model_type) -> a transformers config."""
    spec = {k: v for k, v in spec.items() if k not in ("image_mean", "image_std", "transformers_version")}
    return AutoConfig.for_model(spec.pop("model_type"), **spec)


def read_mean_std(path):
    """image_mean/std from a pretrained tower's preprocessor_config.json, if it has one."""
    from transformers.utils import cached_file
    f = cached_file(path, "preprocessor_config.json", _raise_exceptions_for_missing_entries=False)
    if f is None:
        return None, None
    with open(f) as fh:
        cfg = json.load(fh)
    return cfg.get("image_mean"), cfg.get("image_std")


class VisionTower(nn.Module):
    """Any Hugging Face vision encoder with patch outputs: a ViT (CLIP, SigLIP) or a conv net (ConvNeXt,
    ResNet), whose [C, h, w] feature map gives h*w tokens. select_layer picks the hidden state (LLaVA
    uses -2, the penultimate layer); select_feature is 'patch' (drop a ViT's CLS token) or 'cls_patch'."""

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
        self.num_patches = (c.image_size // c.patch_size) ** 2 if hasattr(c, "patch_size") else None
        if select_feature not in ("patch", "cls_patch"):
            raise ValueError(f"mm_vision_select_feature={select_feature!r}: use 'patch' or 'cls_patch'")
        self.select_layer, self.select_feature = select_layer, select_feature
        with torch.no_grad():  # the token count and width, whatever the architecture
            _, self.num_tokens, self.hidden_size = self(torch.zeros(1, 3, self.image_size, self.image_size)).shape

    @property
    def trainable(self):
        return any(p.requires_grad for p in self.parameters())

    def spec(self):
        """The config dict that rebuilds this tower (with random weights)."""
        return {**self.encoder.config.to_dict(), "image_mean": self.image_mean, "image_std": self.image_std}

    def freeze_unused(self):
        """Freeze the parameters that cannot reach the selected features (layers past select_layer, a
        pooling head): they would never get a gradient, and DDP insists that trainable ones do."""
        params = [p for p in self.parameters() if p.requires_grad]
        x = torch.zeros(1, 3, self.image_size, self.image_size, device=params[0].device, dtype=params[0].dtype)
        grads = torch.autograd.grad(self(x).sum(), params, allow_unused=True)
        for p, g in zip(params, grads):
            if g is None:
                p.requires_grad_(False)

    def forward(self, pixel_values):
        h = self.encoder(pixel_values=pixel_values, output_hidden_states=True).hidden_states[self.select_layer]
        if h.dim() == 4:  # a conv net's [N, C, h, w] map: each cell is a patch
            return h.flatten(2).transpose(1, 2)
        n_extra = h.shape[1] - self.num_patches  # CLS (CLIP, ViT) or none (SigLIP)
        return h[:, n_extra:] if self.select_feature == "patch" else h[:, max(n_extra - 1, 0):]


def build_projector(kind, d_in, d_out):
    """LLaVA's names: 'linear', 'mlp2x_gelu' (Linear, GELU, Linear), 'mlp3x_gelu', ..."""
    if kind == "linear":
        return nn.Linear(d_in, d_out)
    m = re.fullmatch(r"mlp(\d+)x_gelu", kind)
    if not m:
        raise ValueError(f"mm_projector_type={kind!r}: use 'linear' or 'mlp{{N}}x_gelu'")
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


class VLM(nn.Module):
    """config: vision_tower, model_name_or_path (each a path or a config dict), mm_vision_select_layer,
    mm_vision_select_feature, mm_patch_merge, mm_projector_type, image_token_id, vocab_size (of the tokenizer)."""

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
        self.patch_merge = config.get("mm_patch_merge", 1)
        self.mm_projector = build_projector(config["mm_projector_type"], self.vision_tower.hidden_size * self.patch_merge ** 2,
                                            self.llm.config.hidden_size)
        self.image_token_id = config["image_token_id"]
        self.num_image_tokens = self.vision_tower.num_tokens // self.patch_merge ** 2
        # what rebuilds this model from scratch, before its weights are loaded
        self.config = {**config, "vision_tower": self.vision_tower.spec(), "model_name_or_path": self.llm.config.to_dict(),
                       "vocab_size": self.llm.get_input_embeddings().weight.shape[0]}

    def encode_images(self, pixel_values):
        """[N, 3, H, W] -> [N, num_image_tokens, llm width]. A frozen tower builds no autograd graph."""
        tower = self.vision_tower
        with torch.set_grad_enabled(tower.trainable and torch.is_grad_enabled()):
            feats = tower(pixel_values.to(next(tower.parameters()).dtype))
        feats = merge_patches(feats, self.patch_merge)
        return self.mm_projector(feats.to(next(self.mm_projector.parameters()).dtype))

    def embed(self, input_ids, pixel_values=None):
        """Token embeddings with the image features written over the image-token positions."""
        emb = self.llm.get_input_embeddings()(input_ids)
        is_image = input_ids == self.image_token_id
        n = int(is_image.sum())
        if pixel_values is None or len(pixel_values) == 0:
            if n:
                raise ValueError(f"the batch has {n} image tokens but no pixel_values")
            return emb
        feats = self.encode_images(pixel_values)
        if n != feats.shape[0] * feats.shape[1]:
            raise ValueError(f"the batch has {n} image tokens, but {feats.shape[0]} images x {feats.shape[1]} "
                             f"tokens each = {feats.shape[0] * feats.shape[1]}")
        return emb.masked_scatter(is_image.unsqueeze(-1), feats.to(emb.dtype))

    def forward(self, batch):
        """Mean cross-entropy over the labelled tokens. The LM head runs on those positions only, so
        the [B, T, vocab] logits of prompts and images are never made."""
        emb = self.embed(batch["input_ids"], batch.get("pixel_values"))
        out = self.llm.base_model(inputs_embeds=emb, attention_mask=batch.get("attention_mask"),
                                  position_ids=batch.get("position_ids"), use_cache=False)
        labels = batch["labels"][:, 1:]
        keep = labels != IGNORE_INDEX
        logits = self.llm.get_output_embeddings()(out.last_hidden_state[:, :-1][keep])
        return F.cross_entropy(logits.float(), labels[keep])

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, pixel_values=None, max_new_tokens=64, temperature=0.0,
                 top_p=1.0, stop_token_ids=(), generator=None):
        """Prompts left-padded in a batch -> [B, <=max_new_tokens] new tokens (with a KV cache).
        temperature 0 is greedy; otherwise sample from the top_p nucleus. A finished row repeats its
        stop token."""
        emb = self.embed(input_ids, pixel_values)
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        out = self.llm(inputs_embeds=emb, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=True, logits_to_keep=1)
        stop = torch.tensor(list(stop_token_ids), dtype=torch.long, device=input_ids.device)
        done = torch.zeros(len(input_ids), dtype=torch.bool, device=input_ids.device)
        last = torch.zeros_like(done, dtype=torch.long)
        new = []
        for _ in range(max_new_tokens):
            tok = sample_next(out.logits[:, -1].float(), temperature, top_p, generator)
            tok = torch.where(done, last, tok)
            new.append(tok)
            done |= torch.isin(tok, stop)
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


def save(model, path, extra_config=None):
    """Write config.json and model.safetensors into the folder `path`."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"model": model.config, **(extra_config or {})}, f, indent=1)
    save_model(model, os.path.join(path, "model.safetensors"))  # handles tied embeddings


def checkpoints(out_dir):
    """The complete checkpoints in out_dir, oldest first (a .tmp folder is one that was cut short)."""
    if not os.path.isdir(out_dir):
        return []
    return [os.path.join(out_dir, n) for n in sorted(os.listdir(out_dir)) if n.startswith("ckpt-") and not n.endswith(".tmp")]


def load(path, device="cpu"):
    """Rebuild a VLM from config.json (random init) and load model.safetensors into it."""
    cfg_file, weights = os.path.join(path, "config.json"), os.path.join(path, "model.safetensors")
    for f in (cfg_file, weights):
        if not os.path.exists(f):
            raise FileNotFoundError(f"{f}: not a glimpse checkpoint (missing {os.path.basename(f)})")
    with open(cfg_file) as f:
        config = json.load(f)
    model = VLM(config["model"])
    try:
        load_model(model, weights, device=str(device))
    except Exception as e:
        raise RuntimeError(f"{weights}: cannot load the weights ({e})") from e
    return model.to(device), config
