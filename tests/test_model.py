"""model.py: towers, projectors, the loss against a full-logits reference, image placement, generation
with and without a KV cache, embedding resizing (save/load: test_checkpoint.py; regions: test_ferret.py)."""
import json
import logging
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_LLM, TINY_TOWER
from transformers import AutoModelForCausalLM, CLIPConfig, CLIPModel
from transformers.utils import logging as hf_logging

from conversation import tokenize
from data import ShardDataset, collate, preprocess
from model import VLM, VisionTower, VLMConfig, build_projector, hf_config, resize_embeddings

SIGLIP = dict(TINY_TOWER, model_type="siglip_vision_model")
# One tiny random config per family (32-pixel images in 8-pixel patches: 16 patches), with the number of
# tokens each puts before its patches: CLS, or CLS and registers (DINOv2), or none (SigLIP)
DINOV2 = dict(model_type="dinov2", hidden_size=32, mlp_ratio=2, num_hidden_layers=1, num_attention_heads=2,
              image_size=32, patch_size=8)
TOWERS = {"clip": (TINY_TOWER, 1), "siglip": (SIGLIP, 0), "dinov2": (DINOV2, 1),
          "dinov2_registers": (dict(DINOV2, model_type="dinov2_with_registers", num_register_tokens=2), 3),
          "vit": (dict(TINY_TOWER, model_type="vit"), 1)}
TINY_GPT2 = dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=2, n_positions=512, initializer_range=0.3)
_DECODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
LLMS = {
    "llama": TINY_LLM,  # tied embeddings
    "qwen2": dict(_DECODER, model_type="qwen2"),
    "mistral": dict(_DECODER, model_type="mistral", head_dim=16),
    "gemma": dict(_DECODER, model_type="gemma", head_dim=16),  # embeddings scaled by sqrt(width), tied
    "gemma2": dict(_DECODER, model_type="gemma2", head_dim=16, final_logit_softcapping=5.0),  # capped logits
    "gpt2": TINY_GPT2,  # absolute positions, tied, no embed_tokens
    "opt": dict(model_type="opt", hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2,
                word_embed_proj_dim=32),
    "cohere": dict(_DECODER, model_type="cohere", logit_scale=4.0),  # logits scaled after the head
    "granite": dict(_DECODER, model_type="granite", logits_scaling=0.25),
}


def make_model(tokenizer, seed=0, **overrides):
    torch.manual_seed(seed)
    config = dict(vision_tower=TINY_TOWER, model_name_or_path=TINY_LLM, mm_vision_select_layer=-1,
                  mm_vision_select_feature="patch", mm_projector_type="mlp2x_gelu",
                  image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vocab_size=len(tokenizer))
    config.update(overrides)
    return VLM(VLMConfig(**config)).eval()


@pytest.fixture(scope="module")
def model(tokenizer):
    return make_model(tokenizer)


def get_batch(shapes, tokenizer, model, n=4, start=0):
    """n records of the shapes train set from shards made (once per image-token count) in the fixture's folder."""
    t, k = model.vision_tower, model.num_image_tokens
    out = str(shapes / f"shards-{k}")
    preprocess(str(shapes / "train.json"), str(shapes), out, tokenizer, "vicuna_v1", k, num_proc=1, quiet=True)
    d = ShardDataset(out, t.image_size, t.image_mean, t.image_std)
    return collate([d[i] for i in range(start, start + n)], tokenizer.pad_token_id)


# towers and projectors ---------------------------------------------------------------------------------

@pytest.mark.parametrize("family", list(TOWERS))
@pytest.mark.parametrize("feature", ["patch", "cls_patch"])
@pytest.mark.parametrize("layer", [-1, -2])
def test_tower_gives_num_tokens_features(family, feature, layer):
    spec, n_prefix = TOWERS[family]
    torch.manual_seed(0)
    tower = VisionTower(spec, layer, feature).eval()
    x = torch.randn(2, 3, 32, 32)
    out = tower(x)
    assert tower.num_patches == 16 and tower.num_prefix == n_prefix
    assert out.shape == (2, tower.num_tokens, 32)
    hidden = tower.encoder(pixel_values=x, output_hidden_states=True).hidden_states[layer]
    assert hidden.shape[1] == 16 + n_prefix
    # 'patch': the patches only; 'cls_patch': the CLS token (the first) and the patches, never registers
    expected = (hidden[:, n_prefix:] if feature == "patch" or not n_prefix
                else torch.cat([hidden[:, :1], hidden[:, n_prefix:]], 1))
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_tower_token_counts():
    assert VisionTower(TINY_TOWER, -2, "patch").num_tokens == 16
    assert VisionTower(TINY_TOWER, -2, "cls_patch").num_tokens == 17
    assert VisionTower(SIGLIP, -2, "patch").num_tokens == 16
    assert VisionTower(SIGLIP, -2, "cls_patch").num_tokens == 16  # SigLIP has no CLS token
    registers = TOWERS["dinov2_registers"][0]
    assert VisionTower(registers, -2, "patch").num_tokens == 16
    assert VisionTower(registers, -2, "cls_patch").num_tokens == 17
    with pytest.raises(ValueError, match="select_feature"):
        VisionTower(TINY_TOWER, -2, "cls")


def test_tower_is_frozen_by_default_and_trainable_on_request(shapes, tokenizer):
    model = make_model(tokenizer, seed=5, vision_tower=dict(TINY_TOWER, attention_dropout=0.5)).train()
    tower = model.vision_tower
    assert not tower.trainable and not tower.training and model.llm.training  # LLaVA's default: frozen, eval mode
    batch = get_batch(shapes, tokenizer, model, n=2)
    with torch.no_grad():
        first = tower(batch["pixel_values"])
    assert not tower(batch["pixel_values"]).requires_grad  # no autograd graph through a frozen tower
    torch.testing.assert_close(tower(batch["pixel_values"]), first, rtol=0, atol=0)  # no dropout
    model(batch).backward()
    assert all(p.grad is None for p in tower.parameters()) and model.mm_projector[0].weight.grad is not None
    tower.requires_grad_(True)
    model.train()
    assert tower.trainable and tower.training
    assert tower(batch["pixel_values"]).requires_grad
    # the image size and normalization come from the tower's own config
    assert (tower.image_size, tower.image_mean) == (32, pytest.approx([0.48145466, 0.4578275, 0.40821073]))
    assert VisionTower(DINOV2).image_mean == [0.485, 0.456, 0.406]


def test_tower_normalization_defaults_and_overrides():
    clip = VisionTower(TINY_TOWER)
    assert clip.image_mean == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    assert VisionTower(SIGLIP).image_std == [0.5, 0.5, 0.5]
    assert VisionTower({**TINY_TOWER, "image_mean": [0.1, 0.2, 0.3]}).image_mean == [0.1, 0.2, 0.3]
    # spec() rebuilds the same architecture
    again = VisionTower(clip.spec())
    assert [p.shape for p in again.parameters()] == [p.shape for p in clip.parameters()]
    assert again.image_mean == clip.image_mean


@pytest.mark.parametrize("kind, n_linear", [("linear", 1), ("mlp2x_gelu", 2), ("mlp3x_gelu", 3)])
def test_projector_types(kind, n_linear):
    p = build_projector(kind, 12, 20)
    linears = [m for m in p.modules() if isinstance(m, torch.nn.Linear)]
    gelus = [m for m in p.modules() if isinstance(m, torch.nn.GELU)]
    assert len(linears) == n_linear and len(gelus) == n_linear - 1
    assert (linears[0].in_features, linears[-1].out_features) == (12, 20)
    x = torch.randn(3, 5, 12)
    ref = x
    for i, lin in enumerate(linears):
        ref = lin(ref) if i == 0 else lin(F.gelu(ref))
    torch.testing.assert_close(p(x), ref)
    with pytest.raises(ValueError, match="mm_projector_type"):
        build_projector("mlp2x_relu", 12, 20)


def test_identity_projector():
    assert isinstance(build_projector("identity", 20, 20), torch.nn.Identity)
    with pytest.raises(ValueError, match="identity"):
        build_projector("identity", 12, 20)


# the loss and image placement --------------------------------------------------------------------------

def manual_embed(model, input_ids, pixel_values):
    """Independent reference: image i's projected features, in order, at the image tokens of its row."""
    emb = model.llm.get_input_embeddings()(input_ids).clone()
    feats = model.mm_projector(model.vision_tower(pixel_values))
    k = 0
    for b in range(len(input_ids)):
        pos = (input_ids[b] == model.image_token_id).nonzero().flatten()
        for start in range(0, len(pos), model.num_image_tokens):
            block = pos[start:start + model.num_image_tokens]
            assert block.tolist() == list(range(block[0], block[0] + model.num_image_tokens))  # contiguous
            emb[b, block] = feats[k]
            k += 1
    assert k == len(pixel_values)
    return emb


def reference_loss(model, batch):
    emb = manual_embed(model, batch["input_ids"], batch["pixel_values"])
    logits = model.llm(inputs_embeds=emb, attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                           ignore_index=-100)


@pytest.mark.parametrize("projector", ["linear", "mlp2x_gelu", "identity"])
@pytest.mark.parametrize("feature", ["patch", "cls_patch"])
def test_loss_equals_full_logits_reference(shapes, tokenizer, projector, feature):
    model = make_model(tokenizer, seed=1, mm_projector_type=projector, mm_vision_select_feature=feature)
    batch = get_batch(shapes, tokenizer, model, n=4)
    assert (batch["attention_mask"] == 0).any()  # right padding is exercised
    with torch.no_grad():
        loss = model(batch)
        ref = reference_loss(model, batch)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", list(LLMS))
def test_loss_equals_full_logits_reference_for_each_llm(shapes, tokenizer, family):
    """The LM head on labelled positions only, against the family's own forward over all positions (which
    applies Gemma 2's logit softcapping, Cohere's logit_scale, Granite's logits_scaling)."""
    model = make_model(tokenizer, seed=6, model_name_or_path={**LLMS[family], "initializer_range": 0.2})
    batch = get_batch(shapes, tokenizer, model, n=3)
    with torch.no_grad():
        loss = model(batch)
        ref = reference_loss(model, batch)
    torch.testing.assert_close(loss, ref, rtol=0, atol=1e-5)


def test_an_llm_whose_logits_lm_head_does_not_reproduce_is_refused(tokenizer):
    # FalconH1 multiplies its logits by lm_head_multiplier, which lm_head does not apply: training would
    # fit other logits than generation uses, so the model is refused at construction
    falcon = dict(model_type="falcon_h1", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, lm_head_multiplier=0.25, mamba_d_ssm=32,
                  mamba_n_heads=4, mamba_d_head=8, mamba_d_state=8, mamba_chunk_size=8)
    with pytest.raises(ValueError, match="falcon_h1: its forward changes the logits"):
        make_model(tokenizer, model_name_or_path=falcon)


def test_embed_writes_features_at_image_positions(shapes, tokenizer, model):
    batch = get_batch(shapes, tokenizer, model, n=3)
    with torch.no_grad():
        emb = model.embed(batch["input_ids"], batch["pixel_values"])
        ref = manual_embed(model, batch["input_ids"], batch["pixel_values"])
        text = model.llm.get_input_embeddings()(batch["input_ids"])
    torch.testing.assert_close(emb, ref, rtol=0, atol=0)
    is_image = batch["input_ids"] == model.image_token_id
    assert torch.equal(emb[~is_image], text[~is_image])
    assert not torch.allclose(emb[is_image], text[is_image])


def test_pixels_change_the_loss_and_gradients_reach_the_tower(shapes, tokenizer):
    model = make_model(tokenizer, seed=2)
    model.vision_tower.requires_grad_(True)
    model.train()
    model.vision_tower.freeze_unused()  # the post-layernorm cannot reach hidden_states[-1]
    assert sum(p.requires_grad for p in model.vision_tower.parameters()) > 10
    assert not model.vision_tower.encoder.post_layernorm.weight.requires_grad
    batch = get_batch(shapes, tokenizer, model, n=2, start=1)  # two different images (records come in pairs per image)
    loss = model(batch)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for p in model.vision_tower.parameters() if p.requires_grad)
    assert all(p.grad is not None for p in model.mm_projector.parameters())
    with torch.no_grad():
        swapped = model({**batch, "pixel_values": batch["pixel_values"].flip(0)})
        noise = model({**batch, "pixel_values": torch.randn_like(batch["pixel_values"])})
    assert abs(swapped.item() - loss.item()) > 1e-6 and abs(noise.item() - loss.item()) > 1e-6


def test_image_token_count_mismatch_raises(shapes, tokenizer, model):
    batch = get_batch(shapes, tokenizer, model, n=2)
    with pytest.raises(ValueError, match="image tokens"):
        model({**batch, "pixel_values": batch["pixel_values"][:1]})
    with pytest.raises(ValueError, match="image tokens"):
        model({**batch, "pixel_values": torch.cat([batch["pixel_values"]] * 2)})
    with pytest.raises(ValueError, match="no pixel_values"):
        model({**batch, "pixel_values": batch["pixel_values"][:0]})
    ids = batch["input_ids"].clone()
    ids[0, (ids[0] == model.image_token_id).nonzero()[0]] = 5  # one image token fewer
    with pytest.raises(ValueError, match="image tokens"):
        model({**batch, "input_ids": ids})


# generation --------------------------------------------------------------------------------------------

def prompts(shapes, tokenizer, model, n):
    qs = json.loads((shapes / "val_questions.json").read_text())[:n]
    ids = [tokenize("vicuna_v1", [{"from": "human", "value": "<image>\n" + q["question"]}], tokenizer,
                    model.num_image_tokens)[0] for q in qs]
    from data import load_image
    t = model.vision_tower
    pixels = torch.stack([load_image(str(shapes / q["image"]), "pad", t.image_size, t.image_mean, t.image_std)
                          for q in qs])
    return ids, pixels


# transformers deprecates a keyword with a FutureWarning (past_key_values -> cache, dropped in 5.40, after which
# it would be ignored silently): an error in the generation tests, so that generate keeps to the current API
NO_DEPRECATIONS = pytest.mark.filterwarnings("error::FutureWarning")


@contextmanager
def transformers_log():
    """transformers' log records while inside, its once-per-process notices too: reading an output's
    past_key_values is deprecated with a log line, not a warning."""
    records, handler = [], logging.Handler()
    handler.emit = records.append
    logging.Logger.warning_once.cache_clear()  # transformers' lru_cache: a notice given before is given again
    hf_logging.add_handler(handler)
    try:
        yield records
    finally:
        hf_logging.remove_handler(handler)


def greedy_without_cache(model, ids, pixels, n):
    """Recompute the whole sequence for every new token: no KV cache, no padding. pixels: one image or several."""
    emb = model.embed(torch.tensor([ids]), pixels if pixels.dim() == 4 else pixels[None])
    out = []
    for _ in range(n):
        tok = model.llm(inputs_embeds=emb).logits[0, -1].argmax()
        out.append(int(tok))
        emb = torch.cat([emb, model.llm.get_input_embeddings()(tok.view(1, 1))], 1)
    return out


@pytest.fixture(scope="module", params=["llama", "gpt2", "opt", "gemma2"])
def gen_model(tokenizer, request):
    """Llama (rotary positions, which a constant shift leaves unchanged), GPT-2 and OPT (absolute positions,
    so the position ids of left-padded rows must be right; OPT's own are offset) and Gemma 2 (sliding
    window, capped logits). A larger init than the default 0.02 makes the logits of a random model depend
    on the context, so position or cache mistakes change the tokens."""
    llm = {**LLMS[request.param], "initializer_range": 0.3}
    if request.param == "gemma2":  # untied: Gemma's scaled, tied embeddings make a random model repeat its input
        llm.update(tie_word_embeddings=False, sliding_window=16)  # and a window shorter than the prompts
    return make_model(tokenizer, seed=3, model_name_or_path=llm)


@NO_DEPRECATIONS
@torch.no_grad()
def test_generate_with_cache_equals_recomputation(shapes, tokenizer, gen_model):
    ids, pixels = prompts(shapes, tokenizer, gen_model, 2)
    for p, px in zip(ids, pixels):
        got = gen_model.generate(torch.tensor([p]), torch.ones(1, len(p), dtype=torch.long), px[None],
                                 max_new_tokens=12)[0].tolist()
        ref = greedy_without_cache(gen_model, p, px, 12)
        assert got == ref
        assert len(set(ref)) > 2  # not a degenerate repetition that any position error would also produce


@torch.no_grad()
def test_an_image_its_template_shows_twice_is_generated_from_twice(shapes, tokenizer):
    """sample.ask (eval.py's) writes a message's one image into both of its blocks under vicuna_v1_image_both."""
    from sample import ask, image_args
    model = make_model(tokenizer, seed=3, model_name_or_path={**TINY_LLM, "initializer_range": 0.3})
    q = json.loads((shapes / "val_questions.json").read_text())[0]
    both = "vicuna_v1_image_both"
    message = [{"from": "human", "value": "<image>\n" + q["question"]}]
    ids = tokenize(both, message, tokenizer, model.num_image_tokens)[0]
    assert ids.count(model.image_token_id) == 2 * model.num_image_tokens
    _, pixels = prompts(shapes, tokenizer, model, 1)
    ref = tokenizer.decode(greedy_without_cache(model, ids, torch.cat([pixels, pixels]), 8), skip_special_tokens=True)
    got = ask(model, tokenizer, both, image_args(model, {}), [str(shapes / q["image"])], [q["question"]], 8)
    assert got == [ref.split("</s>")[0].strip()] and got[0]


@NO_DEPRECATIONS
@torch.no_grad()
def test_left_padded_batch_equals_rows(shapes, tokenizer, gen_model):
    ids, pixels = prompts(shapes, tokenizer, gen_model, 6)
    assert len({len(p) for p in ids}) > 1  # prompts of different lengths
    T = max(map(len, ids))
    input_ids = torch.full((len(ids), T), tokenizer.pad_token_id)
    mask = torch.zeros_like(input_ids)
    for i, p in enumerate(ids):
        input_ids[i, T - len(p):], mask[i, T - len(p):] = torch.tensor(p), 1
    batched = gen_model.generate(input_ids, mask, pixels, max_new_tokens=10)
    for i, (p, px) in enumerate(zip(ids, pixels)):
        row = gen_model.generate(torch.tensor([p]), torch.ones(1, len(p), dtype=torch.long), px[None],
                                 max_new_tokens=10)
        assert batched[i].tolist() == row[0].tolist(), i


@NO_DEPRECATIONS
@torch.no_grad()
def test_generate_stops_and_repeats_the_stop_token(shapes, tokenizer, gen_model):
    ids, pixels = prompts(shapes, tokenizer, gen_model, 3)
    p = ids[0]
    free = gen_model.generate(torch.tensor([p]), torch.ones(1, len(p), dtype=torch.long), pixels[:1],
                              max_new_tokens=8)[0]
    stop = int(free[2])
    first = free.tolist().index(stop)
    out = gen_model.generate(torch.tensor([p]), torch.ones(1, len(p), dtype=torch.long), pixels[:1], max_new_tokens=8,
                             stop_token_ids={stop})[0]
    assert out.tolist() == free[:first + 1].tolist()  # a single row stops right after its stop token


@NO_DEPRECATIONS
@torch.no_grad()
def test_generate_stops_at_a_stop_sequence(shapes, tokenizer, gen_model):
    ids, pixels = prompts(shapes, tokenizer, gen_model, 2)
    T = max(map(len, ids))
    input_ids = torch.full((2, T), tokenizer.pad_token_id)
    mask = torch.zeros_like(input_ids)
    for i, p in enumerate(ids):
        input_ids[i, T - len(p):], mask[i, T - len(p):] = torch.tensor(p), 1
    free = gen_model.generate(input_ids, mask, pixels, max_new_tokens=10)
    seq = free[0, 3:5].tolist()  # a stop string of two tokens, as row 0 writes it at steps 4 and 5
    ends_with_seq = lambda new: ((new[:, -2:] == torch.tensor(seq)).all(1) if new.shape[1] >= 2  # noqa: E731
                                 else torch.zeros(2, dtype=torch.bool))
    out = gen_model.generate(input_ids, mask, pixels, max_new_tokens=10, stop=ends_with_seq)
    first = next(i for i in range(1, 10) if free[0, i - 1:i + 1].tolist() == seq)
    assert out[0, :first + 1].tolist() == free[0, :first + 1].tolist()
    assert (out[0, first + 1:] == out[0, first]).all()  # then repeats its last token
    rows_end = [next((i for i in range(1, 10) if free[r, i - 1:i + 1].tolist() == seq), 9) for r in range(2)]
    assert out.shape[1] == max(rows_end) + 1  # generation ends when every row has stopped
    assert out[1, :rows_end[1] + 1].tolist() == free[1, :rows_end[1] + 1].tolist()


@NO_DEPRECATIONS
def test_sampling_is_reproducible_with_a_generator(shapes, tokenizer, gen_model):
    ids, pixels = prompts(shapes, tokenizer, gen_model, 1)
    args = (torch.tensor(ids), torch.ones(1, len(ids[0]), dtype=torch.long), pixels, 8, 1.0, 0.9, ())
    a = gen_model.generate(*args, generator=torch.Generator().manual_seed(0))
    b = gen_model.generate(*args, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)


@NO_DEPRECATIONS
@pytest.mark.parametrize("family", list(LLMS))
@torch.no_grad()
def test_generate_passes_the_cache_by_its_current_name_for_each_llm(shapes, tokenizer, family):
    """Every family takes generate's KV cache as `cache` (no deprecated keyword, no deprecated output field
    read), and the cache still gives the tokens of recomputation."""
    model = make_model(tokenizer, seed=3, model_name_or_path={**LLMS[family], "initializer_range": 0.3})
    ids, pixels = prompts(shapes, tokenizer, model, 1)
    with transformers_log() as logged:
        got = model.generate(torch.tensor(ids), torch.ones(1, len(ids[0]), dtype=torch.long), pixels,
                             max_new_tokens=6)
    assert not [r.getMessage() for r in logged if "deprecated" in r.getMessage()]
    assert got[0].tolist() == greedy_without_cache(model, ids[0], pixels[0], 6)


# embeddings -----------------------------------------------------------------------------

@pytest.mark.parametrize("tied", [True, False])
def test_resize_embeddings_sets_new_rows_to_the_mean(tied):
    torch.manual_seed(0)
    llm = AutoModelForCausalLM.from_config(hf_config({**TINY_LLM, "vocab_size": 50, "tie_word_embeddings": tied}))
    old_in = llm.get_input_embeddings().weight.detach().clone()
    old_out = llm.get_output_embeddings().weight.detach().clone()
    resize_embeddings(llm, 56)
    new_in, new_out = llm.get_input_embeddings().weight, llm.get_output_embeddings().weight
    assert new_in.shape == new_out.shape == (56, 32) and llm.config.vocab_size == 56
    assert torch.equal(new_in[:50], old_in) and torch.equal(new_out[:50], old_out)
    torch.testing.assert_close(new_in[50:], old_in.mean(0).expand(6, -1), rtol=0, atol=1e-7)
    torch.testing.assert_close(new_out[50:], old_out.mean(0).expand(6, -1), rtol=0, atol=1e-7)
    assert (new_in.data_ptr() == new_out.data_ptr()) == tied
    resize_embeddings(llm, 40)  # never shrinks
    assert llm.get_input_embeddings().weight.shape == (56, 32)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma", "gpt2", "opt"])
def test_new_tokens_start_at_the_mean_and_tied_embeddings_stay_tied(tokenizer, family):
    """A pretrained LLM's vocabulary grown to the tokenizer's (with <image> and the like added)."""
    torch.manual_seed(0)
    llm = AutoModelForCausalLM.from_config(hf_config({**LLMS[family], "vocab_size": len(tokenizer) - 5}))
    tied = llm.get_input_embeddings().weight is llm.get_output_embeddings().weight
    assert tied == (family != "qwen2")
    old_in = llm.get_input_embeddings().weight.detach().clone()
    old_out = llm.get_output_embeddings().weight.detach().clone()
    resize_embeddings(llm, len(tokenizer))
    new_in, new_out = llm.get_input_embeddings().weight, llm.get_output_embeddings().weight
    assert new_in.shape[0] == new_out.shape[0] == len(tokenizer) == llm.config.vocab_size
    assert (new_in is new_out) == tied
    assert torch.equal(new_in[:-5], old_in) and torch.equal(new_out[:-5], old_out)
    torch.testing.assert_close(new_in[-5:], old_in.mean(0).expand(5, -1), rtol=0, atol=1e-6)
    torch.testing.assert_close(new_out[-5:], old_out.mean(0).expand(5, -1), rtol=0, atol=1e-6)


def test_vision_tower_from_a_saved_clip_folder(tmp_path):
    vision = {k: v for k, v in TINY_TOWER.items() if k != "model_type"}
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=99,
                bos_token_id=0, eos_token_id=1, pad_token_id=1)
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    clip.save_pretrained(tmp_path / "clip")
    (tmp_path / "clip" / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.1, 0.2, 0.3],
                                                                             "image_std": [0.4, 0.5, 0.6]}))
    torch.manual_seed(1)
    tower = VisionTower(str(tmp_path / "clip"), -2, "patch").eval()
    assert type(tower.encoder).__name__ == "CLIPVisionModel"
    ref = {k.removeprefix("vision_model."): v for k, v in clip.vision_model.state_dict().items()}
    got = {k.removeprefix("vision_model."): v for k, v in tower.encoder.state_dict().items()}
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    assert not any("text" in k for k in tower.state_dict())
    assert (tower.image_mean, tower.image_std) == ([0.1, 0.2, 0.3], [0.4, 0.5, 0.6])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = clip.vision_model(pixel_values=x, output_hidden_states=True).hidden_states[-2][:, 1:]
        torch.testing.assert_close(tower(x), expected, rtol=0, atol=0)


CONVNEXT = dict(model_type="convnext", image_size=32, patch_size=2, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1])


def test_conv_tower_turns_its_feature_map_into_tokens():
    torch.manual_seed(0)
    tower = VisionTower(CONVNEXT, -1, "patch").eval()
    x = torch.randn(2, 3, 32, 32)
    fmap = tower.encoder(pixel_values=x, output_hidden_states=True).hidden_states[-1]  # [2, 16, 8, 8]
    assert fmap.shape == (2, 16, 8, 8) and tower.num_tokens == tower.num_patches == 64 and tower.hidden_size == 16
    out = tower(x)
    # token i is the cell (row i // 8, column i % 8), read left to right, top to bottom
    torch.testing.assert_close(out[:, 8 * 3 + 5], fmap[:, :, 3, 5], rtol=0, atol=0)
    tower.requires_grad_(True)
    tower.freeze_unused()  # the final LayerNorm only feeds the pooled output
    assert (not tower.encoder.layernorm.weight.requires_grad
            and tower.encoder.embeddings.patch_embeddings.weight.requires_grad)


def test_merge_patches_groups_neighbours():
    from model import merge_patches
    feats = torch.arange(2 * 16 * 3, dtype=torch.float).reshape(2, 16, 3)  # a 4x4 grid of 3-vectors
    merged = merge_patches(feats, 2)
    assert merged.shape == (2, 4, 12)
    grid = feats.reshape(2, 4, 4, 3)
    # the top-right merged token holds the patches (0,2), (0,3), (1,2), (1,3)
    expected = torch.cat([grid[:, 0, 2], grid[:, 0, 3], grid[:, 1, 2], grid[:, 1, 3]], -1)
    torch.testing.assert_close(merged[:, 1], expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="mm_patch_merge"):
        merge_patches(torch.zeros(1, 9, 3), 2)


def test_model_with_merge_has_fewer_image_tokens(shapes, tokenizer):
    m = make_model(tokenizer, vision_tower=CONVNEXT, mm_patch_merge=2)
    assert m.num_image_tokens == 16
    batch = get_batch(shapes, tokenizer, m, n=2)
    assert torch.isfinite(m(batch))
