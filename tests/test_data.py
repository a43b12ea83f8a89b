"""data.py: record validation, truncation, image transforms, collation and distributed, resumable sampling."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from conversation import IGNORE_INDEX
from data import (SupervisedDataset, collate, epoch_order, load_image, rank_batches, read_records, steps_per_epoch, truncate,
                  validate)

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def dataset(shapes, tokenizer, data_path=None, image_folder=None, num_image_tokens=4, **kw):
    return SupervisedDataset(str(data_path or shapes / "train.json"), str(image_folder or shapes), tokenizer,
                             kw.pop("template", "vicuna_v1"), num_image_tokens, 32, CLIP_MEAN, CLIP_STD, **kw)


# validation -----------------------------------------------------------------------------------------

GOOD = {"id": "good", "image": "images/train_000000.png",
        "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "red"}]}


@pytest.mark.parametrize("bad, problem", [
    ({"image": "images/nope.png"}, "does not exist"),
    ({"conversations": [{"from": "human", "value": "<image>\nWhat?"}]}, "no assistant"),
    ({"conversations": [{"from": "bot", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "red"}]}, "message 0"),
    ({"conversations": [{"from": "human", "value": "What?"}, {"from": "gpt", "value": "red"}]}, "found 0"),
    ({"conversations": [{"from": "human", "value": "<image><image>\nWhat?"}, {"from": "gpt", "value": "red"}]}, "found 2"),
    ({"image": None, "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "red"}]},
     "no 'image'"),
    ({"conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": 3}]}, "message 1"),
    ({"conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": None}]}, "message 1"),
    ({"conversations": []}, "conversations"),
    ({"conversations": [{"from": "gpt", "value": "red"}, {"from": "human", "value": "<image>\nWhat?"}]}, "turns must go"),
    ({"conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": ""}]}, "is empty"),
    ({"image": ["a.png"]}, "file name"),
])
def test_bad_record_error_names_the_record(shapes, tokenizer, tmp_path, bad, problem):
    record = {**GOOD, "id": "culprit", **bad}
    path = tmp_path / "data.json"
    path.write_text(json.dumps([GOOD, record, GOOD]))
    with pytest.raises(ValueError) as e:
        dataset(shapes, tokenizer, path)
    msg = str(e.value)
    assert f"{path}:1" in msg and "'culprit'" in msg and problem in msg, msg


def test_broken_json_file_is_named(shapes, tokenizer, tmp_path):
    path = tmp_path / "broken.json"
    path.write_text(json.dumps([GOOD])[:-3])
    with pytest.raises(ValueError, match="broken.json: not valid JSON"):
        dataset(shapes, tokenizer, path)
    path.write_text(json.dumps(GOOD))
    with pytest.raises(ValueError, match="broken.json: expected a JSON list"):
        dataset(shapes, tokenizer, path)


def test_jsonl_and_several_files(shapes, tokenizer, tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.json"
    a.write_text("\n".join(json.dumps({**GOOD, "id": f"a{i}"}) for i in range(3)) + "\n")
    b.write_text(json.dumps([{**GOOD, "id": "b0"}]))
    records = read_records(f"{a},{b}", str(shapes), "vicuna_v1,plain")
    assert [(r["id"], t, w) for r, _, t, w in records] == [
        ("a0", "vicuna_v1", f"{a}:0"), ("a1", "vicuna_v1", f"{a}:1"), ("a2", "vicuna_v1", f"{a}:2"), ("b0", "plain", f"{b}:0")]
    assert len(dataset(shapes, tokenizer, f"{a},{b}")) == 4
    with pytest.raises(ValueError, match="image folders"):
        read_records(f"{a},{b}", f"{shapes},{shapes},{shapes}", "vicuna_v1")
    with pytest.raises(ValueError, match="templates"):
        read_records(f"{a},{b}", str(shapes), "vicuna_v1,plain,plain")


def test_text_only_record_is_valid(shapes, tokenizer, tmp_path):
    record = {"id": "t", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
    assert validate(record, str(shapes), "x:0") is None
    path = tmp_path / "t.json"
    path.write_text(json.dumps([record, GOOD]))
    d = dataset(shapes, tokenizer, path)
    assert d[0]["pixel_values"].shape == (0, 3, 32, 32) and d[1]["pixel_values"].shape == (1, 3, 32, 32)


# truncation -------------------------------------------------------------------------------------------

IMG = 99


def test_truncate_keeps_short_samples_unchanged():
    ids, labels = [1, IMG, IMG, IMG, 5, 6, 7], [-100] * 5 + [6, 7]
    assert truncate(ids, labels, 7, IMG) == (ids, labels)
    assert truncate(ids, labels, 100, IMG) == (ids, labels)


def test_truncate_cuts_text_after_the_image_block():
    ids, labels = [1, IMG, IMG, IMG, 5, 6, 7, 8], [-100] * 5 + [6, 7, 8]
    assert truncate(ids, labels, 7, IMG) == (ids[:7], labels[:7])
    assert truncate(ids, labels, 6, IMG) == (ids[:6], labels[:6])


@pytest.mark.parametrize("max_len", [1, 2, 3, 4, 5])
def test_truncate_never_cuts_an_image_block(max_len):
    ids, labels = [1, 2, IMG, IMG, IMG, 6, 7], [-100] * 5 + [6, 7]
    # every cut up to the block's end leaves no whole block (and nothing trained): the sample is dropped
    assert truncate(ids, labels, max_len, IMG) is None


@pytest.mark.parametrize("max_len", [4, 5])
def test_truncate_drops_a_sample_rather_than_its_image(max_len):
    # trained text before the image (an image in a later turn): a cut through the block must not leave a
    # partial block, nor a sample whose image has no tokens left (its pixel_values would not match)
    ids, labels = [1, 5, 6, IMG, IMG, IMG, 8], [-100, 5, 6, -100, -100, -100, 8]
    assert truncate(ids, labels, max_len, IMG) is None
    assert truncate(ids, labels, 6, IMG) == (ids[:6], labels[:6])


def test_truncate_drops_samples_with_nothing_trained_left():
    ids, labels = [1, IMG, IMG, 4, 5, 6, 7], [-100] * 5 + [6, 7]
    assert truncate(ids, labels, 5, IMG) is None
    assert truncate(ids, labels, 6, IMG) == (ids[:6], labels[:6])


def test_dataset_truncation_skips_and_keeps_whole_blocks(shapes, tokenizer):
    full = dataset(shapes, tokenizer, num_image_tokens=16)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    first_trained = [int(np.flatnonzero(labels != IGNORE_INDEX)[0]) for _, labels, _ in full.samples]
    max_len = sorted(first_trained)[len(first_trained) // 2] + 1  # about half the records keep a trained token
    d = dataset(shapes, tokenizer, num_image_tokens=16, model_max_length=max_len)
    expect_kept = [i for i, f in enumerate(first_trained) if f < max_len]
    n = len(full)
    assert 0 < len(expect_kept) < n
    assert len(d) == len(expect_kept) and len(d.skipped) == n - len(expect_kept)
    assert sorted(d.skipped) == sorted(f"{shapes / 'train.json'}:{i}" for i in range(n) if i not in expect_kept)
    for (ids, labels, image), i in zip(d.samples, expect_kept):
        full_ids, full_labels, full_image = full.samples[i]
        n = min(len(full_ids), max_len)
        assert np.array_equal(ids, full_ids[:n]) and np.array_equal(labels, full_labels[:n]) and image == full_image
        assert list(ids).count(image_id) == 16 and (labels != IGNORE_INDEX).any()
    with pytest.raises(ValueError, match="no usable records"):
        dataset(shapes, tokenizer, num_image_tokens=16, model_max_length=min(first_trained))


# images ------------------------------------------------------------------------------------------------

def thirds_image(path, w, h):
    """Left third blue, middle green, right third red."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 3] = (0, 0, 255)
    a[:, w // 3: 2 * w // 3] = (0, 255, 0)
    a[:, 2 * w // 3:] = (255, 0, 0)
    Image.fromarray(a).save(path)
    return str(path)


def normalized(rgb, mean=CLIP_MEAN, std=CLIP_STD):
    return torch.tensor([(c / 255 - m) / s for c, m, s in zip(rgb, mean, std)])


@pytest.mark.parametrize("mode", ["pad", "square_nocrop", "crop"])
@pytest.mark.parametrize("w, h", [(90, 30), (30, 60), (32, 32), (10, 10)])
def test_image_modes_give_square_tensors(tmp_path, mode, w, h):
    x = load_image(thirds_image(tmp_path / "i.png", w, h), mode, 32, CLIP_MEAN, CLIP_STD)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and torch.isfinite(x).all()


def test_pad_fills_with_the_mean_color(tmp_path):
    x = load_image(thirds_image(tmp_path / "wide.png", 90, 30), "pad", 32, CLIP_MEAN, CLIP_STD)
    pad = normalized([int(255 * m) for m in CLIP_MEAN])  # LLaVA: tuple(int(x * 255) for x in image_mean)
    for y, xx in [(0, 0), (0, 16), (31, 31), (2, 5)]:  # top and bottom bands are padding
        torch.testing.assert_close(x[:, y, xx], pad, atol=1e-5, rtol=0)
    torch.testing.assert_close(x[:, 16, 2], normalized((0, 0, 255)), atol=1e-5, rtol=0)  # content keeps its aspect
    torch.testing.assert_close(x[:, 16, 16], normalized((0, 255, 0)), atol=1e-5, rtol=0)
    tall = load_image(thirds_image(tmp_path / "tall.png", 30, 90), "pad", 32, CLIP_MEAN, CLIP_STD)
    torch.testing.assert_close(tall[:, 16, 0], pad, atol=1e-5, rtol=0)  # left and right bands


def test_square_nocrop_keeps_everything_and_crop_keeps_the_center(tmp_path):
    path = thirds_image(tmp_path / "wide.png", 90, 30)
    squashed = load_image(path, "square_nocrop", 32, CLIP_MEAN, CLIP_STD)
    torch.testing.assert_close(squashed[:, 16, 0], normalized((0, 0, 255)), atol=1e-5, rtol=0)
    torch.testing.assert_close(squashed[:, 16, 31], normalized((255, 0, 0)), atol=1e-5, rtol=0)
    cropped = load_image(path, "crop", 30, CLIP_MEAN, CLIP_STD)  # the middle 30x30: all green
    torch.testing.assert_close(cropped, normalized((0, 255, 0)).view(3, 1, 1).expand(3, 30, 30), atol=1e-5, rtol=0)


def test_image_errors(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(RuntimeError, match="bad.png"):
        load_image(str(tmp_path / "bad.png"), "pad", 32, CLIP_MEAN, CLIP_STD)
    with pytest.raises(ValueError, match="image_aspect_ratio"):
        load_image(thirds_image(tmp_path / "i.png", 30, 60), "stretch", 32, CLIP_MEAN, CLIP_STD)


# batches -----------------------------------------------------------------------------------------------

def test_collate_follows_the_batch_contract(shapes, tokenizer, tmp_path):
    text_only = {"id": "t", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
    records = json.loads((shapes / "train.json").read_text())[:3]
    path = tmp_path / "mix.json"
    path.write_text(json.dumps([records[0], text_only, records[1], records[2]]))
    d = dataset(shapes, tokenizer, path)
    samples = [d[i] for i in range(4)]
    b = collate(samples, tokenizer.pad_token_id)
    T = max(len(s["input_ids"]) for s in samples)
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape == (4, T)
    assert b["input_ids"].dtype == b["labels"].dtype == torch.int64
    assert b["pixel_values"].shape == (3, 3, 32, 32)
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        assert torch.equal(b["input_ids"][i, :n], s["input_ids"]) and torch.equal(b["labels"][i, :n], s["labels"])
        assert (b["input_ids"][i, n:] == tokenizer.pad_token_id).all() and (b["labels"][i, n:] == IGNORE_INDEX).all()
        assert b["attention_mask"][i].tolist() == [1] * n + [0] * (T - n)
    # images in the order their placeholders appear: records 0, 2, 3 (1 has none)
    for k, i in enumerate([0, 2, 3]):
        assert torch.equal(b["pixel_values"][k], samples[i]["pixel_values"][0])


def global_batches(n, micro, accum, world, seed, epoch, start_step=0):
    per_rank = [rank_batches(n, micro, accum, r, world, seed, epoch, start_step) for r in range(world)]
    steps = len(per_rank[0]) // accum
    assert all(len(p) == steps * accum for p in per_rank)
    return [[sorted(sum(per_rank[r][s * accum:(s + 1) * accum], [])) for r in range(world)] for s in range(steps)]


def test_one_process_with_accumulation_equals_two_ranks():
    n = 103
    one = global_batches(n, 4, 2, 1, seed=7, epoch=0)
    two = global_batches(n, 4, 1, 2, seed=7, epoch=0)
    assert len(one) == len(two) == steps_per_epoch(n, 8) == 12
    for (a,), (r0, r1) in zip(one, two):
        assert sorted(r0 + r1) == a and not set(r0) & set(r1)
    # the k-th micro-batch of a step on one process is rank k's micro-batch
    m1 = rank_batches(n, 4, 2, 0, 1, 7, 0)
    assert m1[0::2] == rank_batches(n, 4, 1, 0, 2, 7, 0) and m1[1::2] == rank_batches(n, 4, 1, 1, 2, 7, 0)


@pytest.mark.parametrize("micro, accum, world", [(4, 1, 1), (2, 3, 2), (3, 1, 4), (1, 2, 3)])
def test_each_index_at_most_once_per_epoch_and_ranks_disjoint(micro, accum, world):
    n = 50
    seen = [i for r in range(world) for b in rank_batches(n, micro, accum, r, world, 1, 3) for i in b]
    B = micro * accum * world
    assert len(seen) == len(set(seen)) == (n // B) * B
    assert all(0 <= i < n for i in seen)
    for r in range(world):
        assert all(len(b) == micro for b in rank_batches(n, micro, accum, r, world, 1, 3))


def test_sampling_is_deterministic_per_seed_and_epoch():
    a = rank_batches(64, 4, 2, 1, 2, seed=5, epoch=0)
    assert a == rank_batches(64, 4, 2, 1, 2, seed=5, epoch=0)
    assert a != rank_batches(64, 4, 2, 1, 2, seed=5, epoch=1)
    assert a != rank_batches(64, 4, 2, 1, 2, seed=6, epoch=0)
    assert sorted(sum(a, [])) != sum(a, [])  # shuffled


@pytest.mark.parametrize("start_step", [0, 1, 3, 7, 8])
def test_resume_gives_the_tail_of_the_same_sequence(start_step):
    for rank in range(2):
        full = rank_batches(70, 2, 2, rank, 2, 11, 4)
        assert rank_batches(70, 2, 2, rank, 2, 11, 4, start_step) == full[start_step * 2:]


def test_curriculum_takes_the_files_in_order_each_shuffled():
    order = epoch_order([30, 20], seed=3, epoch=0, curriculum=True)
    assert sorted(order[:30]) == list(range(30)) and sorted(order[30:]) == list(range(30, 50))
    assert order[:30] != list(range(30)) and order[30:] != list(range(30, 50))  # shuffled within each file
    mixed = epoch_order([30, 20], seed=3, epoch=0)
    assert sorted(mixed) == list(range(50)) and set(mixed[:30]) != set(range(30))
    # the distributed contract holds for a curriculum too: one process x 2 micro-steps == 2 ranks
    one = rank_batches([30, 20], 4, 2, 0, 1, 3, 0, curriculum=True)
    assert one[0::2] == rank_batches([30, 20], 4, 1, 0, 2, 3, 0, curriculum=True)
    assert one[1::2] == rank_batches([30, 20], 4, 1, 1, 2, 3, 0, curriculum=True)


def test_dataset_counts_records_per_file_and_applies_each_files_template(shapes, tokenizer):
    d = SupervisedDataset(f"{shapes / 'captions.json'},{shapes / 'train.json'}", str(shapes), tokenizer,
                          "plain,vicuna_v1", 4, 32, CLIP_MEAN, CLIP_STD)
    n_captions, n_train = (len(json.loads((shapes / f).read_text())) for f in ("captions.json", "train.json"))
    assert d.file_sizes == [n_captions, n_train]
    first_caption, first_chat = d.samples[0][0].tolist(), d.samples[n_captions][0].tolist()
    assert "USER" not in tokenizer.decode(first_caption) and "USER:" in tokenizer.decode(first_chat)
