"""lora.py, and LoRA through train.py, checkpoint.save/load and export.py: step 0 is the base model, merging is
exact, targets, scaling, bf16 bases; checkpoints hold the adapters and the other trained weights only,
load onto their base, resume exactly, train the same on 2 gloo processes, and export merged."""
import json
import math
import shutil
import sys

import pytest
import torch
import torch.nn as nn
from conftest import TINY_LLM, TINY_TOWER, run_script
from safetensors.torch import load_file, save_file
from test_distributed import compare

import lora
from checkpoint import load
from model import VLM, VLMConfig

WIDE_LLM = dict(TINY_LLM, hidden_size=128, intermediate_size=512, num_attention_heads=4, num_key_value_heads=4)


def make_model(tokenizer, seed=0, **overrides):
    torch.manual_seed(seed)
    config = dict(vision_tower=TINY_TOWER, model_name_or_path=TINY_LLM, mm_vision_select_layer=-1,
                  mm_vision_select_feature="patch", mm_projector_type="mlp2x_gelu",
                  image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vocab_size=len(tokenizer))
    return VLM(VLMConfig(**{**config, **overrides})).eval()


def make_batch(model, n=2, T=20, seed=0):
    """n records: 2 text tokens, an image's block, T-2 text tokens; the text after the image is labelled."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(5, 300, (n, T), generator=g)
    k = model.num_image_tokens
    ids = torch.cat([text[:, :2], torch.full((n, k), model.image_token_id), text[:, 2:]], 1)
    labels = ids.clone()
    labels[:, :2 + k] = -100
    return dict(input_ids=ids, labels=labels, attention_mask=torch.ones_like(ids),
                pixel_values=torch.randn(n, 3, 32, 32, generator=g))


@torch.no_grad()
def logits(model, batch):
    return model.llm(inputs_embeds=model.embed(batch["input_ids"], batch["pixel_values"])).logits


def wrappers(model):
    return [m for m in model.modules() if isinstance(m, lora.LoRALinear)]


def randomize_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in wrappers(model):
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)


# the layer and the model in memory -------------------------------------------------------------------

@pytest.mark.parametrize("rslora", [False, True])
def test_step_zero_is_the_base_model_exactly(tokenizer, rslora):
    model = make_model(tokenizer)
    batch = make_batch(model)
    before, loss_before = logits(model, batch), model(batch).detach()
    lora.apply_lora(model, lora.find_targets(model), r=4, alpha=8, dropout=0.1, rslora=rslora)
    assert torch.equal(logits(model, batch), before)
    model.train()  # with dropout on the adapters' input: B = 0, so still the base
    loss = model(batch)
    assert torch.equal(loss.detach(), loss_before)
    loss.backward()
    # dL/dA = B^T (...) = 0 at step 0, dL/dB = (...) (A x)^T is not: the first step moves B only
    assert all(m.lora_A.grad.abs().max() == 0 and m.lora_B.grad.abs().max() > 0 for m in wrappers(model))


@pytest.mark.parametrize("rslora", [False, True])
def test_merge_is_exact_and_unmerge_restores_the_base(tokenizer, rslora):
    model = make_model(tokenizer)
    plain_keys = set(model.state_dict())
    batch = make_batch(model)
    lora.apply_lora(model, lora.find_targets(model), r=4, alpha=16, rslora=rslora)
    randomize_adapters(model)
    bases = {k: v.clone() for k, v in model.state_dict().items() if not lora.is_lora(k)}
    wrapped = logits(model, batch)
    removed = lora.merge_lora(model, keep=True)
    assert len(removed) == 14 and not wrappers(model) and set(model.state_dict()) == plain_keys
    merged = logits(model, batch)
    assert (merged - wrapped).abs().max() <= 1e-5 * wrapped.abs().max()  # fp32 rounding of W + s B A
    assert not torch.equal(merged, logits(make_model(tokenizer), batch))  # the adapters are in it
    lora.unmerge_lora(model, removed)  # the base was never written to: back bit for bit
    assert all(torch.equal(v, bases[k]) for k, v in model.state_dict().items() if not lora.is_lora(k))
    assert torch.equal(logits(model, batch), wrapped)


def test_scaling_is_alpha_over_r_or_over_sqrt_r():
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    x = torch.randn(5, 16)
    for rslora, scaling in ((False, 8 / 4), (True, 8 / 2)):
        m = lora.LoRALinear(base, r=4, alpha=8, rslora=rslora)
        assert m.scaling == scaling
        nn.init.normal_(m.lora_B)
        torch.testing.assert_close(m(x) - base(x), scaling * x @ m.lora_A.T @ m.lora_B.T)
        torch.testing.assert_close(m.merged()(x), m(x))


def test_targets(tokenizer):
    model = make_model(tokenizer)
    llm_linears = [f"llm.{n}" for n, m in model.llm.named_modules() if isinstance(m, nn.Linear)]
    everything = lora.find_targets(model)  # LLaVA's all-linear: the LLM's Linears but its head
    assert everything == [n for n in llm_linears if n != "llm.lm_head"] and len(everything) == 2 * 7
    with_tower = lora.find_targets(model, vision_tower=True)
    assert with_tower[:14] == everything and len(with_tower) == 14 + 6  # CLIP layer: q, k, v, out_proj, fc1, fc2
    assert all(n.startswith("vision_tower.encoder.") for n in with_tower[14:])
    assert not any(n.startswith("mm_projector") for n in with_tower)
    # patterns match the end of a name from a dot on
    assert lora.find_targets(model, "q_proj, v_proj") == [f"llm.model.layers.{i}.self_attn.{p}_proj"
                                                           for i in (0, 1) for p in "qv"]
    assert lora.find_targets(model, [r"layers\.1\.mlp\..*"]) == [f"llm.model.layers.1.mlp.{p}_proj"
                                                                  for p in ("gate", "up", "down")]
    for nothing in ("proj", "lm_head", "mm_projector.*"):  # not a whole part of a name; the head; outside the LLM
        with pytest.raises(ValueError, match="matches no nn.Linear"):
            lora.find_targets(model, nothing)
    lora.apply_lora(model, everything, 4, 8)
    with pytest.raises(ValueError, match="already has LoRA"):
        lora.apply_lora(model, everything, 4, 8)


def test_bf16_base_halves_the_frozen_weights_and_trains_the_fp32_adapters(tokenizer):
    full, half = make_model(tokenizer), make_model(tokenizer)
    batch = make_batch(full)
    names = lora.find_targets(full)
    lora.apply_lora(full, names, 4, 8)
    lora.apply_lora(half, names, 4, 8, base_dtype=torch.bfloat16)
    base_bytes = lambda m: sum(w.base.weight.nbytes for w in wrappers(m))  # noqa: E731
    assert base_bytes(half) * 2 == base_bytes(full)
    assert all(w.base.weight.dtype == torch.bfloat16 and w.lora_A.dtype == w.lora_B.dtype == torch.float32
               for w in wrappers(half))
    loss = half(batch)
    assert loss.dtype == torch.float32 and abs(loss.item() - full(batch).item()) < 1e-2 * loss.item()
    loss.backward()
    assert all(w.lora_B.grad.dtype == torch.float32 and w.base.weight.grad is None for w in wrappers(half))
    lora.merge_lora(half)  # merged in fp32: the update is not rounded into bf16
    assert all(m.weight.dtype == torch.float32 for n, m in half.named_modules() if n in names)


# train.py: checkpoints, loading, resume, DDP, export -----------------------------------------------------

@pytest.fixture(scope="module")
def lora_run(train, tmp_path_factory):
    """6 steps of LoRA (r=4, all-linear, dropout 0.05) on a 128-wide LLM, the projector and the tower training
    fully, a checkpoint every 3 steps."""
    return train(tmp_path_factory.mktemp("lora_run"), model_name_or_path=WIDE_LLM, lora_enable=True, lora_r=4,
                 lora_alpha=8, lora_dropout=0.05, max_iters=6, eval_interval=3, keep_last=2, eval_data_path="")


def test_checkpoint_holds_adapters_and_the_other_trained_weights(lora_run):
    out = lora_run.out_dir
    assert sorted(p.name for p in out.iterdir()) == ["base", "ckpt-0000003", "ckpt-0000006", "curves.png", "data",
                                                      "log.jsonl"]
    assert "LoRA r=4 alpha=8 on 14 Linears" in lora_run.stdout
    config = json.loads((out / "ckpt-0000006" / "config.json").read_text())
    c = config["lora"]
    assert (c["r"], c["alpha"], c["dropout"], c["rslora"], c["base_dtype"]) == (4, 8, 0.05, False, "float32")
    assert c["base"] == str(out / "base") and len(c["targets"]) == 14
    base = load_file(str(out / "base" / "model.safetensors"))  # the model as built: a plain full checkpoint
    saved = load_file(str(out / "ckpt-0000006" / "model.safetensors"))
    adapters = {f"{t}.lora_{x}" for t in c["targets"] for x in "AB"}
    assert {k for k in saved if k.startswith("llm.")} == adapters  # no frozen LLM weight
    projector = {k for k in base if k.startswith("mm_projector.")}
    tower = {k for k in base if k.startswith("vision_tower.")}
    assert projector <= set(saved) and set(saved) - adapters - projector <= tower
    assert len(set(saved) & tower) >= 10  # the tower trains fully here (unfreeze_mm_vision_tower)
    assert all(saved[f"{t}.lora_B"].abs().max() > 0 for t in c["targets"])  # trained: B is no longer 0
    # small: about 0.07M of 0.77M numbers here (a 7B at r=128 would be ~0.3B of 7B)
    size = (out / "ckpt-0000006" / "model.safetensors").stat().st_size
    assert size < 0.2 * (out / "base" / "model.safetensors").stat().st_size
    assert sum(v.numel() for k, v in saved.items() if k in adapters) == 2 * (4 * 4 * 256 + 3 * 4 * 640)


def test_checkpoint_loads_onto_its_base(lora_run, tmp_path):
    ckpt = lora_run.out_dir / "ckpt-0000006"
    model, config = load(ckpt)
    saved, base = (load_file(str(ckpt / "model.safetensors")),
                   load_file(str(lora_run.out_dir / "base" / "model.safetensors")))
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())
    assert all(torch.equal(state[k.replace(".weight", ".base.weight")]
                           if k.replace(".weight", "") in config["lora"]["targets"] else state[k], v)
               for k, v in base.items() if k not in saved)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(saved)  # trainable as when saved
    # a missing base is named
    shutil.copytree(ckpt, tmp_path / "moved")
    config["lora"]["base"] = str(tmp_path / "nowhere")
    (tmp_path / "moved" / "config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match="nowhere, which is missing"):
        load(tmp_path / "moved")
    # and so is another base under the same name (e.g. the default retrained since), in a wrapped Linear or
    # in any other frozen weight (a norm)
    for name in ("llm.model.layers.0.mlp.up_proj.weight", "llm.model.norm.weight"):
        shutil.rmtree(tmp_path / "other", ignore_errors=True)
        shutil.copytree(lora_run.out_dir / "base", tmp_path / "other")
        changed = {k: v.clone() for k, v in base.items()}
        changed[name].view(-1)[0] += 1e-3
        save_file(changed, str(tmp_path / "other" / "model.safetensors"))
        config["lora"]["base"] = str(tmp_path / "other")
        (tmp_path / "moved" / "config.json").write_text(json.dumps(config))
        with pytest.raises(ValueError, match="not the one its adapters were trained on"):
            load(tmp_path / "moved")


def test_exact_resume(lora_run, train, tmp_path):
    """As tests/test_train.py::test_exact_resume, with LoRA and its dropout: the masks after the resume are
    those of the uninterrupted run (the RNG state comes back, and nothing else draws from it)."""
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copytree(lora_run.out_dir / "ckpt-0000003", out / "ckpt-0000003")  # its base stays where it is
    resumed = train(out, model_name_or_path=WIDE_LLM, lora_enable=True, lora_r=4, lora_alpha=8, lora_dropout=0.05,
                    max_iters=6, eval_interval=3, keep_last=2, eval_data_path="", init_from="resume")
    assert sorted(resumed.steps) == [4, 5, 6] and not (out / "base").exists()
    for step in (4, 5, 6):
        assert resumed.steps[step] == lora_run.steps[step], step
    a = load_file(str(out / "ckpt-0000006" / "model.safetensors"))
    b = load_file(str(lora_run.out_dir / "ckpt-0000006" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("parallel, base_dtype, tower", [("ddp", "float32", False), ("fsdp", "bfloat16", True)])
def test_two_processes_train_lora_like_one(train, tmp_path, parallel, base_dtype, tower):
    """LoRA under DDP and FSDP (2 gloo processes, each half of every batch) against one process, with
    tests/test_distributed.py's tolerance and reasons for the logged losses and gradient norms, and for the
    weights on a fp32 base. On a bf16 base the fp32-rounding differences of the two runs (reduction order)
    flip some bf16 roundings of the base's inputs; Adam turns such differences in near-zero gradients into
    lr-sized steps, so after 6 steps single elements of B differ by ~1% of B: the losses still agree to 1e-4,
    and the weights are not compared. No adapter dropout, whose masks depend on how the batch is split. The
    tower is frozen as in LLaVA's LoRA recipe, or (the last case) trains through adapters too. Under FSDP, a
    resume from step 3 on 2 processes continues exactly."""
    common = dict(max_iters=6, batch_size=4, val_data_path="", eval_data_path="", lora_enable=True, lora_r=4,
                  lora_dropout=0.0, lora_base_dtype=base_dtype, unfreeze_mm_vision_tower=False, lora_vision_tower=tower,
                  eval_interval=3, keep_last=2)
    one = train(tmp_path / "one", **common)
    two = train(tmp_path / "two", nproc=2, parallel=parallel, **common)
    compare(one, two)
    a = load_file(str(tmp_path / "one" / "ckpt-0000006" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "ckpt-0000006" / "model.safetensors"))
    assert a.keys() == b.keys() and any(lora.is_lora(k) for k in a)
    assert {k for k in a if not lora.is_lora(k)} == {f"mm_projector.{i}.{w}"
                                                     for i in (0, 2) for w in ("weight", "bias")}
    assert any(k.startswith("vision_tower.") for k in a) == tower
    assert json.loads((tmp_path / "two" / "ckpt-0000006" / "config.json").read_text())["lora"]["base_dtype"] == \
        base_dtype
    for k in a if base_dtype == "float32" else []:
        assert (a[k] - b[k]).abs().max() <= 1e-4 * a[k].abs().max() + 1e-6, k
    if parallel == "fsdp":
        shutil.copytree(tmp_path / "two" / "ckpt-0000003", tmp_path / "resumed" / "ckpt-0000003")
        resumed = train(tmp_path / "resumed", nproc=2, parallel=parallel, init_from="resume", **common)
        assert all(resumed.steps[s] == two.steps[s] for s in (4, 5, 6))


def test_export_merges_into_a_plain_glimpse_checkpoint_and_a_transformers_llava(lora_run, tmp_path):
    from transformers import LlavaForConditionalGeneration
    ckpt = lora_run.out_dir / "ckpt-0000006"
    model, _ = load(ckpt)
    batch = make_batch(model)
    ours = logits(model.eval(), batch)
    run_script([sys.executable, "export.py", f"--ckpt={ckpt}", f"--merged_dir={tmp_path / 'merged'}",
                f"--hf_dir={tmp_path / 'hf'}"])
    merged, config = load(tmp_path / "merged")
    assert "lora" not in config and not wrappers(merged) and config["train"]["lora_enable"]
    assert load_file(str(tmp_path / "merged" / "model.safetensors")).keys() == \
        load_file(str(lora_run.out_dir / "base" / "model.safetensors")).keys()
    assert (logits(merged.eval(), batch) - ours).abs().max() <= 1e-5 * ours.abs().max()
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        theirs = hf(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"]).logits
    assert (theirs - ours).abs().max() <= 1e-4


def test_lora_checkpoint_without_lora_enable_is_refused(lora_run, shapes, tmp_path):
    from conftest import train_args
    proc = run_script([sys.executable, "train.py"] + train_args(shapes, tmp_path / "x",
                                                                init_from=lora_run.out_dir / "ckpt-0000006"),
                      check=False)
    assert proc.returncode != 0 and "has LoRA adapters" in proc.stderr and "--merged_dir" in proc.stderr


def test_lora_with_a_frozen_llm_is_refused(shapes, tmp_path):
    from conftest import train_args
    proc = run_script([sys.executable, "train.py"] + train_args(shapes, tmp_path / "x", lora_enable=True,
                                                                freeze_backbone=True),
                      check=False)
    assert proc.returncode != 0 and "cannot also be frozen" in proc.stderr


def test_bf16_run_under_fsdp_saves_a_checkpoint_that_loads_and_resumes(train, tmp_path):
    """The GPU recipe's dtype on the CPU (slow there, so 2 steps): bf16 compute through FSDP's mixed-precision
    policy, LoRA, the frozen tower kept in bf16. Its checkpoint loads onto its base (the base's checksum is
    taken before the tower is cast) and the run resumes from it."""
    common = dict(max_iters=2, batch_size=4, val_data_path="", eval_data_path="", lora_enable=True, lora_r=4,
                  lora_dropout=0.0, unfreeze_mm_vision_tower=False, dtype="bfloat16", parallel="fsdp", eval_interval=1,
                  keep_last=2)
    run = train(tmp_path, nproc=2, **common)
    assert all(math.isfinite(s["loss"]) for s in run.steps.values()) and sorted(run.steps) == [1, 2]
    model, _ = load(tmp_path / "ckpt-0000002")  # in fp32, from the fp32 base and the adapters
    assert wrappers(model) and next(model.vision_tower.parameters()).dtype == torch.float32
    shutil.rmtree(tmp_path / "ckpt-0000002")
    resumed = train(tmp_path, nproc=2, init_from="resume", **common)
    assert sorted(resumed.steps) == [2] and resumed.steps[2] == run.steps[2]
