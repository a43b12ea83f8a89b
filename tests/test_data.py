"""data.py: preprocessing into shards (every kind of bad record named and counted), the shards' samples,
image transforms, collation, and the distributed, resumable sampler (every record exactly once per epoch)."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conversation import IGNORE_INDEX, tokenize
from data import (ShardDataset, Skip, collate, epoch_batches, epoch_order, global_batches, load_image, preprocess,
                  rank_batches, steps_per_epoch, truncate)

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def shards(tmp_path, tokenizer, data_path, image_folder, version="vicuna_v1", num_image_tokens=4, model_max_length=2048,
           name="shards", regions=None, **kw):
    out = str(tmp_path / name)
    preprocess(str(data_path), str(image_folder), out, tokenizer, version, num_image_tokens, model_max_length,
               num_proc=kw.pop("num_proc", 1), quiet=True, regions=regions, **kw)
    return ShardDataset(out, 32, CLIP_MEAN, CLIP_STD, tokenizer=tokenizer, version=version,
                        num_image_tokens=num_image_tokens, model_max_length=model_max_length, regions=regions)


def skipped(d):
    with open(os.path.join(d.path, "skipped.jsonl")) as f:
        return [json.loads(line) for line in f]


# bad records: each kind is skipped with its reason, named by file:index and id (strict: an error) --------

GOOD = {"id": "good", "image": "images/train_000000.png",
        "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "red"}]}
Q, A = {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "red"}


def broken_png(path, shapes):
    data = (shapes / "images" / "train_000000.png").read_bytes()
    path.write_bytes(data[:len(data) // 2])


BAD = {  # name: (record fields over GOOD, or a whole non-record; the reason: its kind, then details)
    "not an object": ("just a string", "not a record: a JSON str"),
    "no conversations": ({"conversations": None, "_drop": "conversations"}, "no conversation: neither"),
    "empty conversation": ({"conversations": []}, "empty conversation"),
    "message not an object": ({"conversations": ["hi", A]}, "message not an object: message 0 is a str"),
    "unknown role": ({"conversations": [{"from": "bot", "value": "<image>\nWhat?"}, A]}, "unknown role: message 0 is from 'bot'"),
    "non-string value": ({"conversations": [Q, {"from": "gpt", "value": 3}]}, "text not a string: message 1 has a int"),
    "null value": ({"conversations": [Q, {"from": "gpt", "value": None}]}, "text not a string: message 1 has a NoneType"),
    "empty value": ({"conversations": [Q, {"from": "gpt", "value": ""}]}, "bad conversation: message 1 (gpt) is empty"),
    "blank value": ({"conversations": [Q, {"from": "gpt", "value": " \n "}]}, "bad conversation: message 1 (gpt) is empty"),
    "reply first": ({"conversations": [A, Q]}, "bad conversation: message 0 is from 'gpt': turns must go"),
    "two questions": ({"conversations": [Q, {"from": "human", "value": "And?"}, A]}, "turns must go"),
    "system not first": ({"conversations": [Q, {"from": "system", "value": "x"}, A]}, "turns must go"),
    "system alone": ({"image": None, "_drop": "image", "conversations": [{"from": "system", "value": "x"}]}, "no assistant reply"),
    "no reply": ({"conversations": [Q]}, "no assistant reply"),
    "image without tag": ({"conversations": [{"from": "human", "value": "What?"}, A]}, "image tags: 0 <image> tags for 1 images"),
    "two tags one image": ({"conversations": [{"from": "human", "value": "<image><image>"}, A]}, "image tags: 2 <image> tags for 1"),
    "tag without image": ({"image": None, "_drop": "image"}, "image tags: 1 <image> tags for 0 images"),
    "image not a name": ({"image": 5}, "bad image field: 'image' must be a file name"),
    "missing image": ({"image": "images/nope.png"}, "missing image: "),
    "not an image": ({"image": "junk.png"}, "unreadable image: "),
    "truncated image": ({"image": "half.png"}, "unreadable image: "),
    "zero-size image": ({"image": "empty.png"}, "empty image file: "),
    "image in a reply": ({"conversations": [{"from": "human", "value": "What?"}, {"from": "gpt", "value": "<image> red"}]},
                         "cannot hold"),
    "box outside": ({"image_w": 48, "image_h": 48, "box_x1y1x2y2": [[[50, 10, 60, 20]], []]}, "box outside the image: [50, 10, 60, 20] in 48x48"),
    "box inverted": ({"image_w": 48, "image_h": 48, "box_x1y1x2y2": [[[20, 10, 10, 20]], []]}, "bad box: [20, 10, 10, 20] is not"),
    "placeholder without boxes": ({"conversations": [{"from": "human", "value": "<image>\nWhat is <bbox_location0>?"}, A]},
                                  "bad placeholder: <bbox_location{i}> in a record without box_x1y1x2y2"),
    "regions on two images": ({"image": ["images/train_000000.png", "images/train_000001.png"], "image_w": 48, "image_h": 48,
                               "box_x1y1x2y2": [[], []], "conversations": [{"from": "human", "value": "<image> <image>"}, A]},
                              "regions on 2 images"),
    "box without size": ({"box_x1y1x2y2": [[[1, 1, 2, 2]], []]}, "bad box: boxes given without a positive image_w"),
    "boxes not per message": ({"image_w": 48, "image_h": 48, "box_x1y1x2y2": [[[1, 1, 2, 2]]]}, "bad box: box_x1y1x2y2 (and masks) must hold a list per message"),
    "placeholder without box": ({"image_w": 48, "image_h": 48, "box_x1y1x2y2": [[[1, 1, 9, 9]], []],
                                 "conversations": [{"from": "human", "value": "<image>\nWhat is <bbox_location1>?"}, A]},
                                "bad placeholder: <bbox_location1> in message 0, which has 1 boxes"),
    "bad segmentation": ({"image_w": 48, "image_h": 48, "box_x1y1x2y2": [[[1, 1, 9, 9]], []], "masks": [[{"size": [48, 48], "counts": [5, 3]}], []],
                          "conversations": [{"from": "human", "value": "<image>\nWhat is <bbox_location0>?"}, A]},
                         "bad segmentation: its runs cover 8 pixels, not 48 x 48"),
    "boxes in another frame": ({"image_w": 96, "image_h": 48, "box_x1y1x2y2": [[[1, 1, 9, 9]], []]},
                               "image size: the boxes are given in 96x48, the file is 48x48"),
    "region token in the text": ({"conversations": [{"from": "human", "value": "<image>\nWhat is <region_fea>?"}, A]},
                                 "region token in the text"),
    "regions without image": ({"image": None, "_drop": "image", "image_w": 48, "image_h": 48, "box_x1y1x2y2": [[], []],
                               "conversations": [{"from": "human", "value": "What?"}, A]}, "regions on 0 images"),
    "sharegpt content list": ({"_drop": "conversations", "messages": [{"role": "user", "content": [{"text": "<image>"}]},
                                                                      {"role": "assistant", "content": "red"}]},
                              "text not a string: message 0 has a list content"),
}


def bad_record(kind):
    fields, reason = BAD[kind]
    if not isinstance(fields, dict):
        return fields, reason
    record = {**GOOD, "id": "culprit", **fields}
    for key in [fields.get("_drop")]:
        record.pop(key, None)
    record.pop("_drop", None)
    return record, reason


@pytest.fixture(scope="module")
def image_folder(shapes, tmp_path_factory):
    """The shapes images, plus a file that is no image, a truncated PNG and an empty file."""
    folder = tmp_path_factory.mktemp("images")
    os.symlink(shapes / "images", folder / "images")
    (folder / "junk.png").write_bytes(b"not a png")
    broken_png(folder / "half.png", shapes)
    (folder / "empty.png").write_bytes(b"")
    return folder


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_record_is_skipped_with_its_reason_and_named(tokenizer, image_folder, tmp_path, kind):
    record, reason = bad_record(kind)
    path = tmp_path / "data.json"
    path.write_text(json.dumps([GOOD, record, {**GOOD, "id": "good2"}]))
    d = shards(tmp_path, tokenizer, path, image_folder)
    assert len(d) == 2 and d.skipped == 1
    (s,) = skipped(d)
    assert s["where"] == f"{path}:1" and reason in s["reason"], s
    assert s["id"] == (None if kind == "not an object" else "culprit")
    with pytest.raises(ValueError) as e:  # strict: the same, as an error
        shards(tmp_path, tokenizer, path, image_folder, strict=True, name="strict")
    assert f"{path}:1" in str(e.value) and reason in str(e.value)


def test_bad_json_line_duplicate_record_and_too_long(tokenizer, image_folder, tmp_path):
    path = tmp_path / "data.jsonl"
    long = {**GOOD, "id": "long", "conversations": [{"from": "human", "value": "<image>\n" + "What? " * 300}, A]}
    same_id = {**GOOD, "conversations": [Q, {"from": "gpt", "value": "blue"}]}  # LLaVA's ids are image ids: kept
    path.write_text("\n".join(json.dumps(r) if isinstance(r, dict) else r
                              for r in [GOOD, '{"id": "broken", "conv', GOOD, long, same_id]) + "\n")
    d = shards(tmp_path, tokenizer, path, image_folder, model_max_length=64)
    assert len(d) == 2
    reasons = {s["where"]: s["reason"] for s in skipped(d)}
    assert reasons[f"{path}:2"].startswith("bad JSON line: ")
    assert reasons[f"{path}:3"] == f"duplicate record: the same id 'good' and content as {path}:1"
    assert reasons[f"{path}:4"] == "too long: over model_max_length=64, nothing left to train"
    # the summary counts by kind
    assert d.manifest["skipped_by_kind"] == {"bad JSON line": 1, "duplicate record": 1, "too long": 1}


def test_distinct_kinds_of_bad_record():
    kinds = {reason.split(":")[0] for _, reason in BAD.values()}
    # + bad JSON line, duplicate record, too long (above); each a check of its own in data.py or conversation.py
    assert len(kinds) + 3 >= 20, sorted(kinds)


def test_a_folder_that_is_not_shards_is_never_replaced(shapes, tokenizer, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "precious.json").write_text(json.dumps([GOOD]))
    with pytest.raises(ValueError, match="holds no shards: not replacing it"):
        preprocess(str(tmp_path / "mine" / "precious.json"), str(shapes), str(tmp_path / "mine"), tokenizer, "vicuna_v1", 4,
                   num_proc=1, quiet=True)
    assert (tmp_path / "mine" / "precious.json").exists()


def test_no_usable_records_is_an_error_every_time(shapes, tokenizer, tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"id": "x"}, {**GOOD, "image": "nope.png"}]))
    for _ in range(2):  # nothing is kept as shards that a second run would take
        with pytest.raises(ValueError, match="no usable records"):
            shards(tmp_path, tokenizer, path, shapes)
    assert not (tmp_path / "shards").exists()
    assert len((tmp_path / "shards.tmp" / "skipped.jsonl").read_text().splitlines()) == 2  # the reasons are kept


def test_strict_refuses_reused_shards_that_skipped_records(shapes, tokenizer, tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([GOOD, {**GOOD, "id": "bad", "image": "nope.png"}]))
    assert shards(tmp_path, tokenizer, path, shapes).skipped == 1
    with pytest.raises(ValueError, match="strict=True, but these shards skipped 1 records"):
        shards(tmp_path, tokenizer, path, shapes, strict=True)


def test_an_unknown_template_is_an_error_before_any_record(shapes, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="unknown chat template 'vicuna_v2'"):
        shards(tmp_path, tokenizer, shapes / "train.json", shapes, version="vicuna_v2")


def test_broken_json_file_is_named(tokenizer, shapes, tmp_path):
    path = tmp_path / "broken.json"
    path.write_text(json.dumps([GOOD])[:-3])
    with pytest.raises(ValueError, match="broken.json: not valid JSON"):
        shards(tmp_path, tokenizer, path, shapes)
    path.write_text(json.dumps(GOOD))
    with pytest.raises(ValueError, match="broken.json: expected a JSON list"):
        shards(tmp_path, tokenizer, path, shapes)
    path.write_text(json.dumps([{"id": "x"}]))
    with pytest.raises(ValueError, match="no usable records"):
        shards(tmp_path, tokenizer, path, shapes)


# shards ------------------------------------------------------------------------------------------------

def test_samples_equal_conversation_tokenize(shapes, tokenizer, tmp_path):
    records = json.loads((shapes / "train.json").read_text())
    d = shards(tmp_path, tokenizer, shapes / "train.json", shapes, num_image_tokens=5)
    assert len(d) == len(records) and d.skipped == 0
    for i in range(0, len(records), 7):
        ids, labels = tokenize("vicuna_v1", records[i]["conversations"], tokenizer, 5)
        s = d[i]
        assert s["input_ids"].tolist() == ids and s["labels"].tolist() == labels and d.lengths[i] == len(ids)
        img = load_image(str(shapes / records[i]["image"]), "pad", 32, CLIP_MEAN, CLIP_STD)
        assert torch.equal(s["pixel_values"], img[None])


def test_sources_jsonl_sharegpt_text_only_and_several_images(shapes, tokenizer, tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.json"
    sharegpt = {"id": "s", "messages": [{"role": "system", "content": "Be brief."},
                                        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    two = {"id": "two", "image": ["images/train_000000.png", "images/train_000001.png"],
           "conversations": [{"from": "human", "value": "<image> and <image>: same?"}, {"from": "gpt", "value": "no"}]}
    a.write_text("\n".join(json.dumps({**GOOD, "id": f"a{i}"}) for i in range(3)) + "\n")
    b.write_text(json.dumps([sharegpt, two, {**GOOD, "id": "b"}]))
    d = shards(tmp_path, tokenizer, f"{a},{b}", shapes, version="vicuna_v1,llava_v1")
    assert len(d) == 6 and list(d.sources) == [0, 0, 0, 1, 1, 1] and list(d.has_image) == [1, 1, 1, 0, 1, 1]
    assert d.manifest["records_per_source"] == [3, 3] and d.manifest["templates"] == ["vicuna_v1", "llava_v1"]
    text = tokenizer.decode(d[3]["input_ids"])
    assert text.startswith("<s>Be brief. USER: Hi ASSISTANT: Hello</s>") and d[3]["pixel_values"].shape == (0, 3, 32, 32)
    assert "curious human" in tokenizer.decode(d[5]["input_ids"])  # the second source's template
    s = d[4]
    assert s["pixel_values"].shape == (2, 3, 32, 32) and (s["input_ids"] == d.image_id).sum() == 8
    with pytest.raises(ValueError, match="image folders"):
        shards(tmp_path, tokenizer, f"{a},{b}", f"{shapes},{shapes},{shapes}", name="x")
    with pytest.raises(ValueError, match="templates"):
        shards(tmp_path, tokenizer, f"{a},{b}", shapes, version="vicuna_v1,plain,plain", name="y")


def test_rerun_on_unchanged_inputs_reuses_the_shards(shapes, tokenizer, tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([GOOD, {**GOOD, "id": "g2"}]))
    d = shards(tmp_path, tokenizer, path, shapes)
    ids_file = os.path.join(d.path, "ids.bin")
    before = os.stat(ids_file).st_mtime_ns
    shards(tmp_path, tokenizer, path, shapes)
    assert os.stat(ids_file).st_mtime_ns == before  # reused
    path.write_text(json.dumps([GOOD, {**GOOD, "id": "g2"}, {**GOOD, "id": "g3"}]))
    assert len(shards(tmp_path, tokenizer, path, shapes)) == 3  # the source changed: made again
    assert len(shards(tmp_path, tokenizer, path, shapes, num_image_tokens=6)) == 3  # so did a setting


def test_shards_made_with_other_settings_are_refused_naming_the_setting(shapes, tokenizer, real_tokenizers, tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([GOOD]))
    d = shards(tmp_path, tokenizer, path, shapes)
    args = dict(path=d.path, image_size=32, image_mean=CLIP_MEAN, image_std=CLIP_STD, tokenizer=tokenizer,
                version="vicuna_v1", num_image_tokens=4, model_max_length=2048)
    ShardDataset(**args)
    for change, setting in [(dict(num_image_tokens=576), "num_image_tokens: 4 in the shards, 576 now"),
                            (dict(model_max_length=4096), "model_max_length"),
                            (dict(version="llava_v1"), "templates: ['vicuna_v1'] in the shards, ['llava_v1'] now"),
                            (dict(tokenizer=real_tokenizers["gpt2"]), "tokenizer:")]:
        with pytest.raises(ValueError, match="made with other settings") as e:
            ShardDataset(**{**args, **change})
        assert setting in str(e.value)


def test_many_processes_make_the_same_shards(shapes, tokenizer, tmp_path):
    # several sources of several pool chunks each (64 records), with skips spread over them
    records = json.loads((shapes / "train.json").read_text())
    for i in range(0, len(records), 9):
        records[i] = {**records[i], "image": "images/nope.png"}
    (tmp_path / "a.json").write_text(json.dumps(records))
    (tmp_path / "b.json").write_text(json.dumps(records[::-1][:100]))
    data = f"{tmp_path / 'a.json'},{shapes / 'captions.json'},{tmp_path / 'b.json'}"
    one = shards(tmp_path, tokenizer, data, shapes, version="vicuna_v1,plain,vicuna_v1", name="one")
    two = shards(tmp_path, tokenizer, data, shapes, version="vicuna_v1,plain,vicuna_v1", name="two", num_proc=2)
    assert one.skipped > 20 and len(one) > 300 and one.n_sources == 3
    for f in ("ids.bin", "trained.bin", "offsets.npy", "lengths.npy", "sources.npy", "image_index.npy", "images.npy", "skipped.jsonl"):
        assert open(os.path.join(one.path, f), "rb").read() == open(os.path.join(two.path, f), "rb").read(), f
    assert one.manifest == two.manifest


def test_an_image_deleted_after_preprocessing_is_an_error_naming_it(shapes, tokenizer, tmp_path):
    img = tmp_path / "img.png"
    img.write_bytes((shapes / "images" / "train_000000.png").read_bytes())
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{**GOOD, "image": "img.png"}]))
    d = shards(tmp_path, tokenizer, path, tmp_path)
    img.unlink()
    with pytest.raises(RuntimeError, match="img.png"):
        d[0]


def test_a_negative_index_is_the_record_with_nothing_trained(shapes, tokenizer, tmp_path):
    d = shards(tmp_path, tokenizer, shapes / "train.json", shapes)
    assert torch.equal(d[~3]["input_ids"], d[3]["input_ids"]) and (d[~3]["labels"] == IGNORE_INDEX).all()


# truncation (compact ids: one image id per image, counted as num_image_tokens) -----------------------

IMG = 99


def cut(ids, trained, max_len, n=3):
    out = truncate(np.array(ids), np.array(trained, bool), max_len, IMG, n)
    return out[0].tolist(), out[1].astype(int).tolist()


def test_truncate_keeps_short_samples_and_counts_image_tokens():
    ids, trained = [1, IMG, 5, 6, 7], [0, 0, 0, 1, 1]  # 7 tokens with the image's 3
    assert cut(ids, trained, 7) == (ids, trained) == cut(ids, trained, 100)
    assert cut(ids, trained, 6) == (ids[:4], trained[:4])


@pytest.mark.parametrize("max_len", [1, 2, 3])
def test_truncate_never_cuts_an_image_block(max_len):
    with pytest.raises(Skip, match="an image would be cut"):
        cut([1, IMG, 5, 6], [0, 0, 1, 1], max_len)


def test_truncate_drops_samples_with_nothing_trained_left():
    with pytest.raises(Skip, match="nothing left to train"):
        cut([1, IMG, 4, 5, 6], [0, 0, 0, 1, 1], 5)


def test_truncation_in_preprocessing_skips_and_counts(shapes, tokenizer, tmp_path):
    full = shards(tmp_path, tokenizer, shapes / "train.json", shapes, num_image_tokens=16, name="full")
    first = [int(np.flatnonzero(full[i]["labels"] != IGNORE_INDEX)[0]) for i in range(len(full))]
    max_len = sorted(first)[len(first) // 2] + 1  # about half the records keep a trained token
    d = shards(tmp_path, tokenizer, shapes / "train.json", shapes, num_image_tokens=16, model_max_length=max_len)
    kept = [i for i, f in enumerate(first) if f < max_len]
    assert 0 < len(kept) < len(full) and len(d) == len(kept) and d.skipped == len(full) - len(kept)
    for j, i in enumerate(kept):
        n = min(len(full[i]["input_ids"]), max_len)
        assert torch.equal(d[j]["input_ids"], full[i]["input_ids"][:n]) and d.lengths[j] == n


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
    d = shards(tmp_path, tokenizer, path, shapes)
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


def per_rank(batches, micro, accum, world, start_step=0):
    out = [rank_batches(batches, micro, accum, r, world, start_step) for r in range(world)]
    assert all(len(p) == (len(batches) - start_step) * accum for p in out)  # every rank runs every micro-step
    return out


@pytest.mark.parametrize("n", [1, 7, 50, 96])
@pytest.mark.parametrize("micro, accum, world", [(4, 1, 1), (2, 3, 2), (3, 1, 3), (1, 2, 3), (5, 2, 2)])
@pytest.mark.parametrize("grouped", [False, True])
def test_every_record_exactly_once_per_epoch_on_any_number_of_ranks(n, micro, accum, world, grouped):
    B = micro * accum * world
    rng = np.random.default_rng(n)
    lengths, has_image = rng.integers(5, 50, n), rng.random(n) < 0.6
    batches = epoch_batches(np.zeros(n, int), B, seed=1, epoch=3, lengths=lengths if grouped else None, has_image=has_image)
    assert len(batches) == steps_per_epoch(n, B)  # grouped too: the two kinds' remainders share batches
    ranks = per_rank(batches, micro, accum, world)
    seen = [i for p in ranks for b in p for i in b if i >= 0]
    assert sorted(seen) == list(range(n))  # exactly once, across all ranks
    for p in ranks:
        for b in p:  # a micro-batch is real records, or one stand-in (~i) where the last batch ran short
            assert b and (min(b) >= 0 or (len(b) == 1 and b[0] < 0))
    for s, chunk in enumerate(batches):
        if len(chunk) == B:  # a full global batch: micro records per micro-batch, no stand-ins
            assert all(len(p[s * accum + k]) == micro and min(p[s * accum + k]) >= 0 for p in ranks for k in range(accum))


def test_one_process_with_accumulation_equals_two_ranks():
    batches = epoch_batches(np.zeros(103, int), 8, seed=7, epoch=0)
    assert len(batches) == 13 and len(batches[-1]) == 7
    (one,), (r0, r1) = per_rank(batches, 4, 2, 1), per_rank(batches, 4, 1, 2)
    assert one[0::2] == r0 and one[1::2] == r1  # the k-th micro-batch of a step on one process is rank k's


def test_sampling_is_deterministic_per_seed_and_epoch():
    a = [b.tolist() for b in epoch_batches(np.zeros(64, int), 8, seed=5, epoch=0)]
    assert a == [b.tolist() for b in epoch_batches(np.zeros(64, int), 8, seed=5, epoch=0)]
    assert a != [b.tolist() for b in epoch_batches(np.zeros(64, int), 8, seed=5, epoch=1)]
    assert a != [b.tolist() for b in epoch_batches(np.zeros(64, int), 8, seed=6, epoch=0)]
    assert sum(a, []) != list(range(64))  # shuffled


@pytest.mark.parametrize("start_step", [0, 1, 3, 8, 9])
def test_resume_gives_the_tail_of_the_same_sequence(start_step):
    batches = epoch_batches(np.zeros(70, int), 8, seed=11, epoch=4)
    full, tail = per_rank(batches, 2, 2, 2), per_rank(batches, 2, 2, 2, start_step)
    assert all(t == f[start_step * 2:] for t, f in zip(tail, full))


def test_curriculum_takes_the_sources_in_order_each_shuffled():
    sources = np.array([0] * 30 + [1] * 20)
    order = epoch_order(sources, seed=3, epoch=0, curriculum=True).tolist()
    assert sorted(order[:30]) == list(range(30)) and sorted(order[30:]) == list(range(30, 50))
    assert order[:30] != list(range(30)) and order[30:] != list(range(30, 50))
    mixed = epoch_order(sources, seed=3, epoch=0).tolist()
    assert sorted(mixed) == list(range(50)) and set(mixed[:30]) != set(range(30))
    batches = epoch_batches(sources, 8, seed=3, epoch=0, curriculum=True)
    assert [len(set(sources[b])) for b in batches] == [1] * len(batches)  # no batch mixes two stages
    assert [int(sources[b[0]]) for b in batches] == [0] * 4 + [1] * 3


def test_a_zero_multiple_leaves_a_source_out():
    sources = np.array([0] * 10 + [1] * 5)
    order = epoch_order(sources, seed=1, epoch=0, multiples=[0, 1]).tolist()
    assert sorted(order) == list(range(10, 15))
    assert sorted(epoch_order(sources, seed=1, epoch=0, multiples=[1, 1, 3]).tolist()) == list(range(15))  # source 2: no records


def test_data_multiple_replicates_each_source():
    sources = np.array([0] * 10 + [1] * 20 + [2] * 8)
    order = epoch_order(sources, seed=1, epoch=0, multiples=[2, 0.5, 1.5])
    counts = np.bincount(order, minlength=38)
    assert (counts[:10] == 2).all() and counts[10:30].sum() == 10 and set(counts[10:30]) == {0, 1}
    assert counts[30:].sum() == 12 and set(counts[30:]) == {1, 2}
    again = epoch_order(sources, seed=1, epoch=1, multiples=[2, 0.5, 1.5])
    assert set(np.flatnonzero(np.bincount(again, minlength=38)[10:30])) != set(np.flatnonzero(counts[10:30]))


@pytest.mark.parametrize("share", [0.0, 0.3, 1.0])  # LLaVA #715: no text-only records crashed its sampler
def test_group_by_modality_length_keeps_kinds_apart_and_sorts(share):
    n, B = 61, 8
    rng = np.random.default_rng(0)
    lengths, has_image = rng.integers(5, 500, n), rng.random(n) >= share
    batches = global_batches(rng.permutation(n), B, lengths, has_image, seed=0, epoch=0)
    assert sorted(np.concatenate(batches).tolist()) == list(range(n))
    full = [b for b in batches if len(b) == B]
    assert len(full) >= (has_image.sum() // B) + ((~has_image).sum() // B)
    for b in full[:len(full) - 1]:
        assert len(set(has_image[b])) == 1  # one kind per batch (only the remainders mix)
        assert (np.diff(lengths[b]) <= 0).all()  # longest first


# Ferret's GRIT records: regions in, boxes out ----------------------------------------------------------------

from data import REGION_TOKEN, decode_segment, fit, fit_xy, place_regions, region_mask, sample_point  # noqa: E402

SCREEN = {"id": 0, "image": "screen.png", "image_w": 1170, "image_h": 2532,  # Ferret-UI's sample, as its schema has it
          "conversations": [{"from": "human", "value": "<image>\nWhat's the UI type of the widget <bbox_location0>?"},
                            {"from": "gpt", "value": "Button"},
                            {"from": "human", "value": "Where is the icon?"},
                            {"from": "gpt", "value": "It is at <bbox_location0>."}],
          "box_x1y1x2y2": [[[445, 524, 692, 632]], [], [], [[1035, 540, 1114, 622]]]}


def messages(record):
    return [{"from": m["from"], "value": m["value"]} for m in record["conversations"]]


@pytest.fixture(scope="module")
def region_tokenizer(shapes):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(shapes / "tokenizer"))
    tok.add_special_tokens({"additional_special_tokens": ["<image>", REGION_TOKEN]})
    return tok


@pytest.mark.parametrize("form", ["box", "point"])
def test_placeholders_become_grid_coordinates_and_region_tokens(form):
    rng = np.random.default_rng(0)
    msgs, regions = place_regions(SCREEN, messages(SCREEN), rng, point_input_sample="center", form=form)
    # human: the region as text on the 0-999 grid (x * 1000 / width, truncated) and its token; gpt: the box
    text = "[380, 206, 591, 249]" if form == "box" else "[485, 228]"  # the center (568, 578) for a point
    assert msgs[0]["value"] == f"<image>\nWhat's the UI type of the widget {text} <region_fea>?"
    assert msgs[3]["value"] == "It is at [884, 213, 952, 245]."
    assert msgs[1:3] == messages(SCREEN)[1:3]
    assert len(regions) == 1 and regions[0]["kind"] == form and regions[0]["box"] == [445, 524, 692, 632]
    assert regions[0]["point"] == ([568, 578] if form == "point" else None)
    # no_coor: the token alone (the features must carry the location); without region features, text only
    msgs, _ = place_regions(SCREEN, messages(SCREEN), rng, no_coor=True, form=form)
    assert msgs[0]["value"].endswith("widget <region_fea>?") and msgs[3]["value"] == "It is at ."
    msgs, regions = place_regions(SCREEN, messages(SCREEN), rng, add_region_feature=False, point_input_sample="center", form=form)
    assert msgs[0]["value"].endswith(f"widget {text}?") and regions == []  # the region's text, as Ferret writes it then


def test_boxes_partly_outside_are_clamped_to_the_image():
    rec = {**SCREEN, "box_x1y1x2y2": [[[-5, 2500, 1200, 2600]], [], [], [[0, 0, 1, 1]]]}
    msgs, regions = place_regions(rec, messages(rec), np.random.default_rng(0), form="box")
    assert regions[0]["box"] == [0, 2500, 1170, 2532] and msgs[0]["value"].endswith("widget [0, 987, 999, 999] <region_fea>?")


def test_box_or_point_is_drawn_per_human_message_and_seeded():
    two = {**SCREEN, "conversations": [{"from": "human", "value": "<image>\n<bbox_location0> and <bbox_location1>?"},
                                       {"from": "gpt", "value": "yes"}],
           "box_x1y1x2y2": [[[10, 10, 50, 50], [100, 100, 300, 300]], []]}
    kinds = []
    for seed in range(200):
        _, regions = place_regions(two, messages(two), np.random.default_rng(seed), point_input_sample="center")
        assert len({r["kind"] for r in regions}) == 1  # one choice for the whole message, as Ferret does
        kinds.append(regions[0]["kind"])
    assert 70 < kinds.count("point") < 130  # 50/50
    again = [place_regions(two, messages(two), np.random.default_rng(seed), point_input_sample="center")[1][0]["kind"]
             for seed in range(200)]
    assert again == kinds


def test_regions_follow_the_order_of_their_tokens():
    rec = {**SCREEN, "conversations": [{"from": "human", "value": "<image>\nIs <bbox_location1> left of <bbox_location0>?"},
                                       {"from": "gpt", "value": "yes"}],
           "box_x1y1x2y2": [[[500, 100, 600, 200], [10, 100, 110, 200]], []]}
    msgs, regions = place_regions(rec, messages(rec), np.random.default_rng(0), form="box")
    assert [r["box"] for r in regions] == [[10, 100, 110, 200], [500, 100, 600, 200]]
    assert msgs[0]["value"] == "<image>\nIs [8, 39, 94, 78] <region_fea> left of [427, 39, 512, 78] <region_fea>?"


def test_point_sampling_modes():
    rng = np.random.default_rng(0)
    box = [20, 10, 60, 30]
    segment = np.zeros((40, 80), bool)
    segment[12:16, 50:58] = True  # the object: a blob in the box's right part
    assert sample_point(box, None, "center", rng) == [40, 20]
    for _ in range(50):
        x, y = sample_point(box, None, "gaussian", rng)
        assert 20 <= x <= 60 and 10 <= y <= 30
        x, y = sample_point(box, segment, "segment_mask|uniform", rng)
        assert segment[y, x]
    assert sample_point(box, segment, "segment_mask|center", rng) == [50, 15]  # the object's pixel nearest (40, 20)
    x, y = sample_point(box, None, "segment_mask|center", rng)  # no segmentation: gaussian
    assert 20 <= x <= 60 and 10 <= y <= 30
    with pytest.raises(ValueError, match="point_input_sample"):
        sample_point(box, None, "corner", rng)


def test_coco_rle_and_polygons_decode_as_coco_does():
    from pycocotools import mask as coco
    rng = np.random.default_rng(0)
    for h, w in [(7, 5), (40, 33), (64, 64)]:
        m = rng.random((h, w)) < 0.3
        m[h // 3:, : w // 2] = True  # long runs too (several characters each in the compressed counts)
        rle = coco.encode(np.asfortranarray(m.astype(np.uint8)))
        rle["counts"] = rle["counts"].decode()
        assert np.array_equal(decode_segment(rle, w, h), m)
        counts = [2, 3, 4, h * w - 9]  # uncompressed counts: 2 out, 3 in, 4 out, the rest in (down the columns)
        theirs = coco.decode(coco.frPyObjects({"size": [h, w], "counts": counts}, h, w)).astype(bool)
        assert np.array_equal(decode_segment({"size": [h, w], "counts": counts}, w, h), theirs) and theirs[2, 0]
    poly = [[10, 10, 30, 10, 30, 20, 10, 20]]
    ours = decode_segment(poly, 40, 30)
    theirs = coco.decode(coco.merge(coco.frPyObjects(poly, 30, 40))).astype(bool)
    # PIL fills the polygon's edges too, COCO the pixels inside them: one more column and row here
    assert ours[theirs].all() and (ours & ~theirs).sum() == 21 + 11 - 1 and not ours[5, 5]


@pytest.mark.parametrize("mode", ["pad", "square_nocrop", "crop"])
def test_region_masks_follow_the_image_transform(tmp_path, mode):
    """A green rectangle at a box in a 120x60 image (the boxes given in a 240x120 frame, as a downscaled
    copy's record would): after the transform, the region's mask covers the green pixels and nothing else
    of note, whatever the mode moves and scales."""
    a = np.full((60, 120, 3), 128, np.uint8)
    a[20:40, 80:100] = (0, 255, 0)  # x 80-99, y 20-39 in the file: x 160-199, y 40-79 in the frame
    img = Image.fromarray(a)
    region = {"kind": "box", "box": [160, 40, 199, 79], "segment": None, "point": None}
    mask = region_mask(region, (240, 120), img.size, mode, 32).numpy()
    pixels = np.asarray(fit(img, mode, 32, (128, 128, 128)), np.int32)
    green = (pixels[..., 1] > 200) & (pixels[..., 0] < 60)
    assert green.any() and mask[green].all()  # every green input pixel is in the region
    assert mask.sum() <= green.sum() + 2 * 32 // 2  # and the region is not much more (a pixel's edge at most)
    # a point region is a small square around the point, inside the object
    point = region_mask({**region, "kind": "point", "point": [180, 60]}, (240, 120), img.size, mode, 32).numpy()
    assert point.any() and mask[point].all() and point.sum() < mask.sum()


def test_a_segmentation_makes_a_free_form_region():
    img_size, frame = (80, 40), (80, 40)
    seg = np.zeros((40, 80), bool)
    seg[10:30, 10:20] = True  # the object fills the box's left half
    from pycocotools import mask as coco
    rle = coco.encode(np.asfortranarray(seg.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode()
    box = {"kind": "box", "box": [10, 10, 29, 29], "segment": rle, "point": None}
    mask = region_mask(box, frame, img_size, "square_nocrop", 80).numpy()[::2]  # back to 80x40
    assert mask[10:30, 10:20].all() and not mask[:, 22:].any()  # the box within the object
    away = {**box, "segment": {"size": [40, 80], "counts": [40 * 70, 40 * 10]}}  # an object outside the box
    assert region_mask(away, frame, img_size, "square_nocrop", 80).numpy()[::2][10:30, 10:30].all()  # the box alone


def test_a_region_cut_away_by_crop_keeps_the_nearest_input_pixel():
    region = {"kind": "box", "box": [0, 20, 5, 30], "segment": None, "point": None}  # the far left of a wide image
    mask = region_mask(region, (200, 50), (200, 50), "crop", 50).numpy()
    assert mask.sum() == 1 and mask[25, 0]  # its nearest: the crop's left edge, at its height


@pytest.mark.parametrize("mode", ["pad", "square_nocrop", "crop"])
def test_a_region_smaller_than_an_input_pixel_still_has_one(mode):
    region = {"kind": "box", "box": [150, 100, 150, 100], "segment": None, "point": None}  # one pixel of 400 x 200
    mask = region_mask(region, (400, 200), (400, 200), mode, 16).numpy()
    x, y = fit_xy(150.5, 100.5, 400, 200, mode, 16)
    assert mask.sum() == 1 and mask[int(y), int(x)]


@pytest.mark.parametrize("mode", ["pad", "square_nocrop", "crop"])
def test_fit_xy_is_where_fit_puts_a_pixel(mode):
    for (w, h), (x, y) in [((90, 30), (70, 10)), ((30, 60), (5, 50)), ((40, 40), (39, 0))]:
        a = np.zeros((h, w), np.float32)
        a[y, x] = 1
        moved = np.asarray(fit(Image.fromarray(a), mode, 20, 0.0, Image.BOX))
        fx, fy = fit_xy(x + 0.5, y + 0.5, w, h, mode, 20)  # the pixel's center
        if 0 <= fx < 20 and 0 <= fy < 20:  # where the transform spread it, its center is within half a pixel
            ys, xs = np.nonzero(moved)
            cx, cy = np.average(xs + 0.5, weights=moved[ys, xs]), np.average(ys + 0.5, weights=moved[ys, xs])
            assert abs(cx - fx) <= 0.5 and abs(cy - fy) <= 0.5, (w, h, x, y, cx, cy, fx, fy)


def test_a_point_region_stays_within_its_box():
    region = {"kind": "point", "box": [10, 10, 12, 30], "point": [11, 20], "segment": None}  # a thin box
    mask = region_mask(region, (40, 40), (40, 40), "square_nocrop", 40).numpy()
    assert mask.any() and not mask[:, :10].any() and not mask[:, 13:].any() and mask[15:26, 10:13].all()


def test_a_point_keeps_to_its_object_and_a_point_alone_to_its_square():
    point = {"kind": "point", "box": [10, 10, 12, 30], "point": [11, 20], "segment": None}
    seg = [[8, 15, 19, 15, 19, 25, 8, 25]]  # the object, x 8-19 and y 15-25, reaches left of the thin box
    with_seg = region_mask({**point, "segment": seg}, (40, 40), (40, 40), "square_nocrop", 40).numpy()
    assert np.array_equal(np.nonzero(with_seg.any(0))[0], np.arange(8, 17)) and not with_seg[:15].any()  # Ferret's: square x object
    alone = region_mask({**point, "box": [11, 20, 11, 20]}, (40, 40), (40, 40), "square_nocrop", 40).numpy()  # sample.py --point
    assert alone.sum() > 1 and alone[20, 11] and alone.sum() == (alone.any(0).sum() * alone.any(1).sum())  # the whole square
    cut = region_mask({**point, "box": [0, 0, 100, 50], "point": [2, 25]}, (200, 50), (200, 50), "crop", 50).numpy()
    assert cut.sum() == 1 and cut[25, 0]  # cut away by crop: the point's nearest input pixel, not the box's center's


def test_degenerate_polygons_cover_nothing_and_a_bad_turn_is_a_skip():
    assert decode_segment([[1, 1, 5, 5], [10, 10, 30, 10, 30, 20]], 40, 30)[12, 20]  # the 2-point one is dropped
    assert not decode_segment([[1, 1, 5, 5]], 40, 30).any()
    with pytest.raises(Skip, match="not a list"):
        place_regions({"image_w": 10, "image_h": 10, "box_x1y1x2y2": [5]}, [{"from": "human", "value": "hi"}], None, form="box")


def test_no_coor_needs_region_features(shapes, region_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="no_coor=True needs add_region_feature=True"):
        shards(tmp_path, region_tokenizer, shapes / "ferret_train.json", shapes, regions=dict(no_coor=True))


def test_grit_shards_give_one_mask_per_region_token(shapes, region_tokenizer, tmp_path):
    Image.fromarray(np.zeros((2532 // 20, 1170 // 20, 3), np.uint8)).save(tmp_path / "screen.png")  # a scaled copy
    records = [{**SCREEN, "id": i} for i in range(6)] + [{**GOOD, "id": "plain"}]
    (tmp_path / "grit.json").write_text(json.dumps(records))
    (tmp_path / "images").symlink_to(shapes / "images")
    regions = dict(add_region_feature=True, point_input_sample="center")
    d = shards(tmp_path, region_tokenizer, tmp_path / "grit.json", tmp_path, regions=regions)
    token = region_tokenizer.convert_tokens_to_ids(REGION_TOKEN)
    assert d.manifest["regions"] == {**regions, "no_coor": False} and len(d) == 7 and d.manifest["format"] == 2
    kinds = set()
    for i in range(7):
        s = d[i]
        n = int((s["input_ids"] == token).sum())
        assert s["region_masks"].shape == (n, 32, 32) and s["region_masks"].dtype == torch.bool
        assert s["region_image"].tolist() == [0] * n and all(m.any() for m in s["region_masks"])
        assert n == (0 if i == 6 else 1)
        kinds.add("[380, 206, 591, 249] <region_fea>" in region_tokenizer.decode(s["input_ids"]))
    assert kinds == {True, False}  # boxes and points, drawn per record
    b = collate([d[6], d[0], d[1]], region_tokenizer.pad_token_id)  # images 0, 1, 2: the regions are on 1 and 2
    assert b["region_masks"].shape == (2, 32, 32) and b["region_image"].tolist() == [1, 2]
    # another region setting is another set of shards
    with pytest.raises(ValueError, match="regions:"):
        ShardDataset(d.path, 32, CLIP_MEAN, CLIP_STD, tokenizer=region_tokenizer, version="vicuna_v1", num_image_tokens=4,
                     model_max_length=2048, regions={**regions, "no_coor": True})


def test_truncation_drops_the_regions_of_the_tokens_it_cuts(shapes, region_tokenizer, tmp_path):
    Image.fromarray(np.zeros((2532 // 20, 1170 // 20, 3), np.uint8)).save(tmp_path / "screen.png")
    long = {**SCREEN, "conversations": [{"from": "human", "value": "<image>\nWhat is <bbox_location0>?"}, {"from": "gpt", "value": "A"},
                                        {"from": "human", "value": "And " * 40 + "<bbox_location0>?"}, {"from": "gpt", "value": "B"}],
            "box_x1y1x2y2": [[[445, 524, 692, 632]], [], [[1035, 540, 1114, 622]], []]}
    (tmp_path / "grit.json").write_text(json.dumps([long]))
    full = shards(tmp_path, region_tokenizer, tmp_path / "grit.json", tmp_path, regions=dict(add_region_feature=True), name="full")
    assert len(full[0]["region_masks"]) == 2
    cut = int(np.flatnonzero(full[0]["labels"] != IGNORE_INDEX)[0]) + 8  # keeps the first answer, not the second question
    d = shards(tmp_path, region_tokenizer, tmp_path / "grit.json", tmp_path, regions=dict(add_region_feature=True),
               model_max_length=cut)
    assert len(d[0]["input_ids"]) == cut and len(d[0]["region_masks"]) == 1
