"""
LoRA (Hu et al., 2021), written out: a frozen nn.Linear W plus a trainable low-rank update,

    y = W x + (alpha / r) * B A x        A: [r, in], B: [out, r], r << in, out

so a finetune trains and saves r * (in + out) numbers per layer instead of in * out. B starts at zero,
so step 0 is the base model exactly, and A at random (as nn.Linear's weight), so that B's gradient is not
zero (with both at zero, neither would ever move). rsLoRA (Kalajdzievski, 2023) scales by alpha / sqrt(r)
instead, which keeps the update's size steady as r grows.

train.py wraps the layers (lora_enable=True and the lora_* keys), checkpoint.save writes the adapters and the
other trained weights only, checkpoint.load puts them back onto their base, and merge_lora turns every
wrapper into one plain nn.Linear with W + (alpha / r) B A (export.py). This file imports nothing from
the project; all but find_targets (which reads a model.VLM's llm and vision_tower) work on any torch module.
"""
import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F


class LoRALinear(nn.Module):
    """An nn.Linear (kept as the child `base`, frozen) plus lora_A and lora_B. The base may be held in a
    lower precision (bf16) than the adapters (fp32): it is only read, never updated."""

    def __init__(self, base, r, alpha, dropout=0.0, rslora=False):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.r, self.alpha, self.dropout_p, self.rslora = r, alpha, dropout, rslora
        self.scaling = alpha / (math.sqrt(r) if rslora else r)
        w = base.weight
        dtype = torch.promote_types(w.dtype, torch.float32)  # fp32 master weights, also over a bf16 base
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=w.device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=w.device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own init
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x):
        y = self.base(x.to(self.base.weight.dtype)).to(x.dtype)  # a no-op unless the base is kept in bf16
        update = F.linear(F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A), self.lora_B)
        return y + update.to(y.dtype) * self.scaling

    def merged(self):
        """One plain nn.Linear with W + scaling * B A, in the adapters' precision (fp32), so that the
        update is not rounded away into a bf16 base."""
        b = self.base
        merged = nn.Linear(b.in_features, b.out_features, bias=b.bias is not None, device=b.weight.device,
                           dtype=self.lora_A.dtype)
        with torch.no_grad():
            merged.weight.copy_(b.weight.to(self.lora_A.dtype) + self.scaling * (self.lora_B @ self.lora_A))
            if b.bias is not None:
                merged.bias.copy_(b.bias)
        return merged.requires_grad_(False)

    def extra_repr(self):
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}"


def find_targets(model, target="all-linear", vision_tower=False):
    """The names (in `model`, a model.VLM) of the nn.Linear layers that get adapters. 'all-linear' takes
    every Linear of the LLM except its output layer (as LLaVA's find_all_linear_names; the projector and
    the vision tower are outside model.llm); otherwise `target` is a list or a comma-separated string of
    regexes, each of which must match the end of a name from a dot on: 'q_proj,v_proj' or
    r'layers\\.[0-3]\\..*_proj'. vision_tower=True adds the tower's Linears. (GPT-2's Conv1D is not a Linear.)"""
    head = model.llm.get_output_embeddings()
    scopes = [("llm", model.llm)] + ([("vision_tower", model.vision_tower)] if vision_tower else [])
    names = [f"{prefix}.{n}" for prefix, scope in scopes for n, m in scope.named_modules()
             if isinstance(m, nn.Linear) and m is not head]
    if target != "all-linear":
        patterns = [p.strip() for p in (target.split(",") if isinstance(target, str) else target) if p.strip()]
        names = [n for n in names if any(re.search(rf"(^|\.)(?:{p})$", n) for p in patterns)]
    if not names:
        where = "the LLM or the vision tower" if vision_tower else "the LLM"
        raise ValueError(f"lora_target={target!r} matches no nn.Linear of {where}")
    return names


def apply_lora(model, names, r, alpha, dropout=0.0, rslora=False, base_dtype=None):
    """Wrap the nn.Linear layers named in `names` (find_targets) in place; base_dtype (e.g. torch.bfloat16)
    casts their frozen weights to save memory. Returns the names."""
    if has_lora(model):
        raise ValueError("the model already has LoRA adapters")
    for name in names:
        base = model.get_submodule(name)
        if not isinstance(base, nn.Linear):
            raise TypeError(f"{name} is a {type(base).__name__}, not an nn.Linear")
        wrapper = LoRALinear(base.to(base_dtype) if base_dtype else base, r, alpha, dropout, rslora)
        replace(model, name, wrapper.train(base.training))  # a model in eval mode stays so (dropout)
    return list(names)


def replace(model, name, module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def is_lora(name):
    return name.endswith((".lora_A", ".lora_B"))


def has_lora(model):
    return any(isinstance(m, LoRALinear) for m in model.modules())


def lora_config(model):
    """The settings that rebuild the model's adapters (apply_lora's arguments), for config.json."""
    wrappers = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    m = next(iter(wrappers.values()))
    return dict(targets=list(wrappers), r=m.r, alpha=m.alpha, dropout=m.dropout_p, rslora=m.rslora,
                base_dtype=str(m.base.weight.dtype).removeprefix("torch."))


@torch.no_grad()
def base_checksum(model, trained):
    """The sum of |w| in float64 over the weights that a LoRA checkpoint does not hold (all but the names in
    `trained`): adapters loaded onto another base (one retrained under the same name) would be silently
    wrong, and this tells."""
    return sum(p.double().abs().sum().item() for n, p in model.named_parameters() if n not in trained)


def lora_state_dict(model):
    """What a LoRA checkpoint holds: the adapters and every other parameter that trains (the projector,
    a tower being finetuned: LLaVA's non_lora_trainables.bin, in the same file). The frozen base is not in
    it: it loads from where it came from."""
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad or is_lora(n)}


def load_lora_state_dict(model, state):
    """Load lora_state_dict's tensors onto a model with the same adapters; every adapter must be there."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [n for n in missing if is_lora(n)]
    if missing or unexpected:
        raise KeyError(f"LoRA weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for n, p in model.named_parameters():  # trainable again what was trainable when saved
        p.requires_grad_(n in state)


def merge_lora(model, keep=False):
    """Replace every LoRALinear by its merged plain nn.Linear: the model becomes the plain architecture
    again, with the same state-dict names as before LoRA (export, a merged checkpoint). One layer at a
    time, so the extra memory is one layer's; keep=True returns the replaced wrappers instead, {name:
    LoRALinear}, whose base weights were never written to: putting them back (unmerge_lora) restores the
    model bit for bit, at the cost of holding both."""
    kept = {}
    for name in [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]:
        wrapper = model.get_submodule(name)
        replace(model, name, wrapper.merged())
        if keep:
            kept[name] = wrapper
    return kept


def unmerge_lora(model, wrappers):
    """Put back the wrappers that merge_lora returned."""
    for name, m in wrappers.items():
        replace(model, name, m)
