"""train_utils.py: the blocks that activation checkpointing and FSDP work on, activation checkpointing
(same loss and gradients, blocks run again in backward), and the FLOP estimate behind the MFU."""
import json

import pytest
import torch
from conftest import TINY_LLM
from test_model import LLMS, TOWERS, get_batch, make_model

from model import hf_config
from train_utils import blocks, checkpoint_blocks, gpu_peak_flops, train_flops


def test_blocks_are_the_repeated_layers():
    from transformers import AutoModel, AutoModelForCausalLM
    for spec in LLMS.values():
        llm = AutoModelForCausalLM.from_config(hf_config({"vocab_size": 300, **spec}))
        found = blocks(llm)
        assert len(found) == llm.config.num_hidden_layers and len({type(b) for b in found}) == 1, spec["model_type"]
    for spec, _ in TOWERS.values():
        assert len(blocks(AutoModel.from_config(hf_config(spec)))) == 1, spec["model_type"]
    convnext = AutoModel.from_config(hf_config(dict(model_type="convnext", image_size=32, num_stages=2,
                                                    hidden_sizes=[8, 16], depths=[2, 2])))
    assert [type(b).__name__ for b in blocks(convnext)] == ["ConvNextStage"] * 2  # the outer blocks, not their layers


def test_activation_checkpointing_gives_the_same_loss_and_gradients(shapes, tokenizer):
    # with dropout: the recomputation must draw the same masks (it restores the RNG state it saw)
    plain, ckpt = (make_model(tokenizer, seed=4, model_name_or_path={**TINY_LLM, "attention_dropout": 0.3}).train()
                   for _ in range(2))
    for m in (plain, ckpt):
        m.vision_tower.requires_grad_(True)
    checkpoint_blocks(blocks(ckpt.llm) + blocks(ckpt.vision_tower.encoder))
    runs = []
    for m in (plain, ckpt):
        batch = get_batch(shapes, tokenizer, m, n=3)
        torch.manual_seed(0)
        loss = m(batch)
        loss.backward()
        runs.append((loss.detach(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}))
    (loss_a, grads_a), (loss_b, grads_b) = runs
    assert torch.equal(loss_a, loss_b) and grads_a.keys() == grads_b.keys() and len(grads_a) > 20
    for k in grads_a:
        torch.testing.assert_close(grads_b[k], grads_a[k], rtol=0, atol=1e-6, msg=k)


def test_checkpointed_blocks_run_again_in_backward(tokenizer):
    model = make_model(tokenizer, seed=1).train()
    block = blocks(model.llm)[0]
    runs = []
    inner = block.self_attn.forward
    block.self_attn.forward = lambda *a, **k: (runs.append(1), inner(*a, **k))[1]
    ids = torch.randint(5, 300, (2, 12))
    model.llm(input_ids=ids).logits.sum().backward()
    assert len(runs) == 1
    checkpoint_blocks([block])
    model.llm(input_ids=ids).logits.sum().backward()
    assert len(runs) == 3  # forward, then again in backward


@pytest.mark.parametrize("setup", ["full", "stage1", "frozen_tower", "lora"])
def test_train_flops_estimate_is_near_the_counted_flops(shapes, tokenizer, setup):
    """train_flops' estimate against torch's FlopCounterMode over a real forward and backward, per training
    setup: what trains decides the backward work (a frozen LLM under the projector: gradients through it,
    no weight gradients; a frozen tower: forward only). A 64-wide, 2-layer LLM, so that attention and the
    head weigh as much as the weights, with eager attention (whose matmuls the counter sees) and rows
    without padding (the estimate counts real tokens: padding is work that MFU does not credit)."""
    from torch.utils.flop_counter import FlopCounterMode

    import lora as lora_
    llm = {**TINY_LLM, "hidden_size": 64, "intermediate_size": 256, "attn_implementation": "eager"}
    model = make_model(tokenizer, model_name_or_path=llm).train()
    model.requires_grad_(setup != "stage1")
    model.mm_projector.requires_grad_(True)
    if setup in ("frozen_tower", "lora"):
        model.vision_tower.requires_grad_(False)
    if setup == "lora":  # as train.py sets it: the LLM trains through its adapters only
        lora_.apply_lora(model, lora_.find_targets(model), r=2, alpha=4)
        for n, p in model.llm.named_parameters():
            p.requires_grad_(lora_.is_lora(n))
    one = get_batch(shapes, tokenizer, model, n=1)
    batch = {k: v.repeat(3, *[1] * (v.dim() - 1)) for k, v in one.items()}
    estimate = train_flops(model)(batch)
    with FlopCounterMode(display=False) as counter:
        model(batch).backward()
    counted = counter.get_total_flops()
    assert abs(estimate - counted) <= 0.05 * counted, (setup, estimate, counted)




def test_one_stage_is_warmup_then_cosine_to_the_floor():
    from train_utils import lr_multiplier
    lr = [lr_multiplier(it, [0], 100, 0, 0.1, 0.05) for it in range(100)]
    assert lr[0] == pytest.approx(1 / 11) and lr[9] == pytest.approx(10 / 11) and lr[10] == pytest.approx(1.0)
    assert all(a > b for a, b in zip(lr[10:], lr[11:])) and lr[99] == pytest.approx(0.05, abs=1e-3)
    assert lr_multiplier(5, [0], 100, 3, 0.1, 0.05) < 1.0 and lr_multiplier(3, [0], 100, 3, 0.1, 0.05) == 1.0


def test_each_stage_has_its_own_schedule():
    """curriculum: captions for 30 steps, conversations for 70, then (a second epoch) captions again."""
    from train_utils import lr_multiplier, stage_starts
    starts = stage_starts([0] * 30 + [1] * 70, 150)
    assert starts == [0, 30, 100, 130] and stage_starts([0, 0, 1], 3) == [0, 2] and stage_starts([0], 5) == [0]
    lr = [lr_multiplier(it, starts, 150, 0, 0.1, 0.0) for it in range(150)]
    # warmup_ratio of each stage's steps: 3 of 30, 7 of 70, 2 of the last 20
    assert lr[0] == lr[100] == 1 / 4 and lr[30] == 1 / 8 and lr[130] == 1 / 3 and lr[3] == lr[37] == lr[132] == 1.0
    assert lr[29] < 0.01 and lr[99] < 0.01 and lr[149] < 0.05
    # the second stage's schedule is the first's, stretched to its 70 steps
    assert lr[30 + 7 + 63 // 2] == pytest.approx(lr[3 + 27 // 2], abs=0.03)


def test_a_resumed_log_keeps_the_lines_up_to_its_step(tmp_path):
    from train_utils import trim_log
    path = tmp_path / "log.jsonl"
    path.write_text("".join(f'{{"step": {s}, "train/loss": {s / 10}}}\n' for s in (0, 5, 10, 15)))
    trim_log(path, 10)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 5, 10]
    trim_log(tmp_path / "none.jsonl", 3)  # a first run has none
    assert not (tmp_path / "none.jsonl").exists()


@pytest.mark.parametrize("name,peak", [("NVIDIA H200", 989e12), ("NVIDIA H200 NVL", 835e12),
                                       ("NVIDIA GH200 480GB", 989e12), ("NVIDIA H100 80GB HBM3", 989e12),
                                       ("NVIDIA H100 PCIe", 756e12), ("NVIDIA L40S", 362e12), ("NVIDIA L4", 121e12),
                                       ("Tesla T4", 0.0)])
def test_the_device_peak_is_the_longest_name_it_holds(name, peak):
    assert gpu_peak_flops(name) == peak
