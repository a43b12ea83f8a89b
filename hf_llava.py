"""
transformers' LlavaForConditionalGeneration, out and in: export.py writes its folder, and checkpoint.load
(train.py's init_from, sample.py, eval.py) reads one, e.g. llava-hf/llava-1.5-7b-hf downloaded.

Llava is model.VLM with fewer choices: a ViT tower read at hidden_states[vision_feature_layer] with or
without its first token, a Linear-act-Linear projector, and the LLM as a base model plus a bare lm_head. A
model within those choices exports; so does one with a linear projector (as Linear, identity, identity
Linear). vLLM and others load the same folder.
"""
import copy
import json
import os

import torch
import torch.nn as nn

from model import VLM, VLMConfig, on_meta, read_mean_std


def hf_llava_config(model):
    """The LlavaConfig of this model, or a ValueError that lists what Llava cannot represent."""
    from transformers import LlavaConfig
    c, tower, llm = model.config, model.vision_tower, model.llm
    problems = []
    if model.region_sampler is not None or c.add_region_feature:
        problems.append("it has a region sampler (Ferret), which Llava does not")
    if tower.conv:
        problems.append(f"its tower ({tower.encoder.config.model_type}) is a conv net: Llava reads a ViT's token "
                        "sequence")
    elif tower.num_prefix > 1:
        problems.append(f"its tower has {tower.num_prefix - 1} register tokens, which Llava would keep as image tokens")
    if model.patch_merge != 1:
        problems.append(f"mm_patch_merge={model.patch_merge}: Llava does not merge patches")
    if c.mm_projector_type not in ("linear", "mlp2x_gelu"):
        problems.append(f"mm_projector_type={c.mm_projector_type!r}: Llava's projector is 'mlp2x_gelu' (or 'linear')")
    for key, neutral in (("final_logit_softcapping", None), ("logit_scale", None), ("logits_scaling", 1.0)):
        if getattr(llm.config, key, None) not in (None, neutral):
            problems.append(f"its LLM sets {key}={getattr(llm.config, key)}, which Llava's plain lm_head would skip")
    if problems:
        raise ValueError("cannot export to transformers' LlavaForConditionalGeneration: " + "; ".join(problems))
    text_config = copy.deepcopy(llm.config)
    # Llava ties lm_head to `embed_tokens`, a name GPT-2 and OPT do not use: those export untied
    text_config.tie_word_embeddings = bool(getattr(llm.config, "tie_word_embeddings", False)) and \
        hasattr(llm.base_model, "embed_tokens")
    drop_cls = tower.num_prefix == 1 and tower.select_feature == "patch"  # Llava's 'default' drops the first token
    return LlavaConfig(vision_config=copy.deepcopy(tower.encoder.config), text_config=text_config,
                       image_token_index=model.image_token_id, image_seq_length=model.num_image_tokens,
                       vision_feature_layer=tower.select_layer,
                       vision_feature_select_strategy="default" if drop_cls else "full",
                       projector_hidden_act="linear" if c.mm_projector_type == "linear" else "gelu",
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
    from transformers import LlavaConfig, LlavaForConditionalGeneration
    # on the meta device (train.py's ranks other than 0), its shapes only
    hf = LlavaForConditionalGeneration(LlavaConfig.from_pretrained(path)) if on_meta() else \
        LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    hf.eval()
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
    select = "cls_patch" if prefix and c.vision_feature_select_strategy == "full" else "patch"
    model = VLM(VLMConfig(vision_tower={**v.to_dict(), "image_mean": mean, "image_std": std},
                          model_name_or_path=c.text_config.to_dict(), mm_vision_select_layer=c.vision_feature_layer,
                          mm_vision_select_feature=select,
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
    try:
        with open(cfg) as f:
            return json.load(f).get("model_type") == "llava"
    except ValueError:  # broken: checkpoint.load says so
        return False

