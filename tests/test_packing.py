"""Packing (data.collate with pack_len, data.rank_batches with costs): a packed step is the padded step on
the same records, for each LLM family, with images, text-only records, several images per record and
Ferret's regions in the mix; a mask that lets a packed record see its neighbour is caught."""
import os
import re
import traceback

import numpy as np
import pytest
import torch
import transformers.masking_utils
from torch.utils._python_dispatch import TorchDispatchMode
from conftest import TINY_TOWER

from conversation import IGNORE_INDEX
from data import collate, deal, pack, rank_batches
from model import VLM, VLMConfig, check_packing

VOCAB, IMAGE, REGION, PAD = 200, 198, 199, 0
_DECODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=512)
FAMILIES = {"llama": dict(_DECODER, model_type="llama"), "qwen2": dict(_DECODER, model_type="qwen2"),
            "mistral": dict(_DECODER, model_type="mistral", head_dim=8),
            "gemma": dict(_DECODER, model_type="gemma", head_dim=8)}
FERRET = dict(add_region_feature=True, sampler_num_init_point=16, sampler_num_sub_point=(8, 4),
              sampler_num_neighbor=(4, 4))


def make_vlm(family, seed=0):
    torch.manual_seed(seed)
    model = VLM(VLMConfig(model_name_or_path=FAMILIES[family], vision_tower=TINY_TOWER, mm_vision_select_layer=-1,
                          vocab_size=VOCAB, image_token_id=IMAGE, region_token_id=REGION, **FERRET))
    return model.train().requires_grad_(True)


def sample(rng, n_text, n_images=0, n_regions=0, tokens=16):
    """A record as ShardDataset gives it: text around n_images blocks of image tokens, n_regions region tokens
    (masks on its first image), its second half trained."""
    ids = [int(rng.integers(1, 190))]
    for _ in range(n_images):
        ids += [IMAGE] * tokens + [int(rng.integers(1, 190))]
    ids += [int(x) for x in rng.integers(1, 190, n_text)] + [REGION] * n_regions + [int(rng.integers(1, 190))]
    ids = torch.tensor(ids)
    labels = torch.where(torch.arange(len(ids)) >= len(ids) // 2, ids, IGNORE_INDEX)
    labels[ids == IMAGE] = IGNORE_INDEX
    masks = torch.zeros(n_regions, 32, 32, dtype=torch.bool)
    for k in range(n_regions):
        x, y = rng.integers(0, 24, 2)
        masks[k, y:y + 8, x:x + 6] = True
    return {"input_ids": ids, "labels": labels, "pixel_values": torch.randn(n_images, 3, 32, 32),
            "region_masks": masks, "region_image": torch.zeros(n_regions, dtype=torch.long)}


def mix(seed=0):
    rng = np.random.default_rng(seed)
    return [sample(rng, 20), sample(rng, 5, 1), sample(rng, 9, 2), sample(rng, 3, 1, 2), sample(rng, 30),
            sample(rng, 12, 1, 1), sample(rng, 2, 1)]


def padded_and_packed(samples, pack_len=64):
    """The two layouts of the same records, in the same order: the packed one's (rows are laid out longest
    first), so that the region sampler draws its random points for the same regions in the same order."""
    rows = pack([len(s["input_ids"]) for s in samples], pack_len)
    in_rows = [samples[i] for row in rows for i in row]
    return collate(in_rows, PAD, IMAGE, REGION), collate(samples, PAD, IMAGE, REGION, pack_len=pack_len)


def loss_and_grads(model, batch, seed=0):
    model.zero_grad()
    torch.manual_seed(seed)  # the region sampler draws its points
    loss = model(batch)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_step(padded, packed):
    (loss_a, grads_a), (loss_b, grads_b) = padded, packed
    assert loss_b == pytest.approx(loss_a, rel=1e-5)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        scale = grads_a[name].norm().item()
        assert (grads_b[name] - grads_a[name]).norm().item() <= 1e-4 * scale + 1e-9, name


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_packed_step_is_the_padded_step(family):
    model = make_vlm(family)
    samples = mix()
    padded, packed = padded_and_packed(samples)
    assert len(packed["input_ids"]) < len(samples) and packed["attention_mask"].float().mean() > \
        padded["attention_mask"].float().mean()  # several records share a row, and less of it is padding
    assert (packed["position_ids"][packed["attention_mask"] == 1] == 0).sum() == len(samples)  # each starts at 0
    assert_same_step(loss_and_grads(model, padded), loss_and_grads(model, packed))


def test_packing_without_the_collated_positions_is_the_same():
    """The model finds the image, region and trained positions itself when a batch does not give them."""
    model, samples = make_vlm("llama"), mix(1)
    packed = collate(samples, PAD, IMAGE, REGION, pack_len=64)
    bare = {k: v for k, v in packed.items() if not k.endswith("_positions")}
    assert_same_step(loss_and_grads(model, packed), loss_and_grads(model, bare))


def test_a_mask_that_leaks_across_records_is_caught(monkeypatch):
    """With transformers' per-record mask switched off, a packed record sees the one before it: the check
    refuses the model, and the packed step is no longer the padded one (so the equality above can fail)."""
    model, samples = make_vlm("llama"), mix()
    check_packing(model.llm)
    monkeypatch.setattr(transformers.masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    with pytest.raises(ValueError, match="lets a packed record attend to the one before it"):
        check_packing(model.llm)
    padded, packed = (loss_and_grads(model, b) for b in padded_and_packed(samples))
    assert packed[0] != pytest.approx(padded[0], rel=1e-4)


def test_collate_packs_records_whole_with_their_images_and_regions():
    samples = mix()
    b = collate(samples, PAD, IMAGE, REGION, pack_len=64)
    assert b["input_ids"].shape[1] <= 64
    found, images, masks = [], [], []
    for r in range(len(b["input_ids"])):
        starts = (b["position_ids"][r] == 0).nonzero().flatten().tolist()
        ends = starts[1:] + [int(b["attention_mask"][r].sum())]
        for s, e in zip(starts, ends):
            k = next(k for k, x in enumerate(samples) if torch.equal(b["input_ids"][r, s:e], x["input_ids"]))  # whole
            assert torch.equal(b["labels"][r, s + 1:e], samples[k]["labels"][1:]) and b["labels"][r, s] == IGNORE_INDEX
            found.append(k)
            images.append(samples[k]["pixel_values"])
            masks += [(m, len(torch.cat(images)) - len(samples[k]["pixel_values"]) + int(i))
                      for m, i in zip(samples[k]["region_masks"], samples[k]["region_image"])]
    assert sorted(found) == list(range(len(samples)))
    # the images in the order of their tokens, each region pointing at its own image
    assert torch.equal(b["pixel_values"], torch.cat(images))
    assert b["region_image"].tolist() == [i for _, i in masks]
    assert torch.equal(b["region_masks"], torch.stack([m for m, _ in masks]))
    assert torch.equal(b["loss_positions"] + 1, (b["labels"].flatten() != IGNORE_INDEX).nonzero().flatten())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rows_hold_every_record_within_capacity_and_pad_little(seed):
    rng = np.random.default_rng(seed)
    lengths = [int(x) for x in np.clip(rng.lognormal(np.log(300), 0.6, 64), 40, 2048)]
    rows = pack(lengths, 2048)
    assert sorted(i for row in rows for i in row) == list(range(64))
    used = [sum(lengths[i] for i in row) for row in rows]
    assert max(used) <= 2048
    assert 1 - sum(lengths) / (len(rows) * max(used)) < 0.03  # padding, against 1 - mean / max padded
    assert 1 - np.mean(lengths) / max(lengths) > 0.3
    assert pack([3000, 10, 20], 2048) == [[0], [2, 1]]  # a record over capacity (none is) raises it
    assert len(pack([1100] * 40, 2048)) == 40  # no two fit a row: one each, however many


def test_micro_batches_cost_about_the_same():
    rng = np.random.default_rng(0)
    costs = rng.integers(20, 500, 64)
    parts = deal(list(range(64)), costs, 4)
    assert sorted(i for p in parts for i in p) == list(range(64))
    loads = [sum(costs[i] for i in p) for p in parts]
    assert max(loads) - min(loads) <= max(costs)
    assert all(p == sorted(p) for p in parts)  # in the order they came


@pytest.mark.parametrize("world,accum", [(1, 1), (2, 2), (4, 1)])
def test_packed_micro_batches_take_every_record_once_on_disjoint_ranks(world, accum):
    rng = np.random.default_rng(1)
    lengths = rng.integers(10, 400, 100)
    batches = [np.arange(i, min(i + 32, 100)) for i in range(0, 100, 32)]
    per_rank = [rank_batches(batches, 8, accum, r, world, 0, lengths) for r in range(world)]
    assert all(len(p) == len(batches) * accum for p in per_rank)
    seen = [i for p in per_rank for m in p for i in m if i >= 0]
    assert sorted(seen) == list(range(100))
    again = [rank_batches(batches, 8, accum, r, world, 2, lengths) for r in range(world)]
    assert again == [p[2 * accum:] for p in per_rank]  # resumable at a step, and deterministic


@pytest.fixture(scope="module")
def padded_run(train, tmp_path_factory):
    return train(tmp_path_factory.mktemp("padded"), batch_size=8, gradient_accumulation_steps=2, max_iters=4)


@pytest.mark.parametrize("nproc", [1, 2])
def test_a_packed_run_trains_as_the_padded_one(padded_run, train, tmp_path, nproc):
    """The same records per step, the same losses, on one process or two (the rows dealt to both ranks);
    and the log tells how much of the positions were padding."""
    packed = train(tmp_path, nproc=nproc, batch_size=8, gradient_accumulation_steps=2, max_iters=4, packing=True,
                   model_max_length=256)
    a, b = padded_run.losses(), packed.losses()
    assert a.keys() == b.keys() == {1, 2, 3, 4}
    assert b[1] == pytest.approx(a[1], abs=2e-4)
    assert all(b[s] == pytest.approx(a[s], abs=2e-3) for s in a)
    pad = [float(x) for x in re.findall(r"padding (\d+)%", padded_run.stdout)]
    packed_pad = [float(x) for x in re.findall(r"padding (\d+)%", packed.stdout)]
    assert len(pad) == len(packed_pad) == 4 and max(packed_pad) < min(pad)


class HostWaits(TorchDispatchMode):
    """Counts the ops that make the host wait for the device: a value read back (.item(), int(), .tolist(),
    a Python bool of a tensor), and those whose output size depends on the data (nonzero, boolean masks)."""

    WAITS = {"_local_scalar_dense", "nonzero", "masked_select", "masked_scatter", "unique", "_unique2",
             "repeat_interleave"}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        bool_index = name.startswith("index") and any(isinstance(t, torch.Tensor) and t.dtype == torch.bool
                                                      for t in (args[1] if len(args) > 1 else ()) or ())
        if name in self.WAITS or bool_index:  # with the file that asked for it
            caller = next(f for f in reversed(traceback.extract_stack()[:-1]) if "/torch/" not in f.filename)
            self.seen.append((name, os.path.basename(caller.filename)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("packed", [False, True])
def test_a_training_step_hardly_waits_for_the_device(packed):
    """Forward, backward, clipping and a fused AdamW step (as on a GPU) of a batch from collate, with images,
    regions and text-only records: no host wait in glimpse's code; transformers reads back one value as it
    makes the attention mask (whether the rows hold packed records); train.py's loop adds its one wait per
    step (the non-finite check, with the stop flag)."""
    model = make_vlm("llama")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], fused=True)
    batch = collate(mix(), PAD, IMAGE, REGION, pack_len=64 if packed else 0)
    model(batch).backward()  # the first step makes the optimizer's state
    optimizer.step()
    with HostWaits() as waits:
        loss = model(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert waits.seen == [("_local_scalar_dense", "masking_utils.py")]
    with HostWaits() as waits:  # the counter sees what it is for
        loss.item(), torch.nonzero(batch["labels"]), batch["labels"][batch["labels"] > 0]
    assert [name for name, _ in waits.seen] == ["_local_scalar_dense", "nonzero", "index"]


def test_the_other_ranks_build_what_rank_0_does_from_a_bf16_folder(tmp_path):
    """On the meta device (train.py's ranks other than 0) the model has rank 0's shapes and dtypes, fp32, from a
    folder saved in bf16 as most hub models are; and the packing check runs on it, unchanged."""
    from transformers import AutoModelForCausalLM

    from model import hf_config
    AutoModelForCausalLM.from_config(hf_config(dict(FAMILIES["qwen2"], vocab_size=VOCAB))).to(
        torch.bfloat16).save_pretrained(tmp_path / "llm")
    config = VLMConfig(model_name_or_path=str(tmp_path / "llm"), vision_tower=TINY_TOWER, vocab_size=VOCAB,
                       image_token_id=IMAGE)
    whole = VLM(config)
    with torch.device("meta"):
        shapes = VLM(config)
    a, b = dict(whole.named_parameters()), dict(shapes.named_parameters())
    assert a.keys() == b.keys() and all(b[n].is_meta and b[n].shape == a[n].shape for n in a)
    assert {p.dtype for p in a.values()} == {p.dtype for p in b.values()} == {torch.float32}
    check_packing(whole.llm)


def test_packing_refuses_flash_attention_2():
    """transformers reads packed records from position_ids for flash-attention in a batch of one row only."""
    from test_configurator import train_defaults

    from train_utils import check_settings
    with pytest.raises(ValueError, match="in a batch of one row only"):
        check_settings({**train_defaults(), "packing": True, "attn_implementation": "flash_attention_2"})
    check_settings({**train_defaults(), "packing": True, "attn_implementation": "sdpa"})
