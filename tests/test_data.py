"""data.py: preprocessing into shards (every kind of bad record named and counted), the shards' samples,
image transforms, collation, and the distributed, resumable sampler (every record exactly once per epoch)."""
import json
import os
import re

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from conversation import IGNORE_INDEX, tokenize
from data import (ShardDataset, Skip, collate, epoch_batches, epoch_order, fit, fit_xy, global_batches, load_image,
                  preprocess, rank_batches, steps_per_epoch, truncate)

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def shards(tmp_path, tokenizer, data_path, image_folder, version="vicuna_v1", num_image_tokens=4, model_max_length=2048,
           name="shards", regions=None, **kw):
    out = str(tmp_path / name)
    # these files are mostly bad records on purpose: any share of them may be skipped, unless a test says
    kw.setdefault("max_skipped", 1.0)
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
    "unknown role": ({"conversations": [{"from": "bot", "value": "<image>\nWhat?"}, A]},
                     "unknown role: message 0 is from 'bot'"),
    "non-string value": ({"conversations": [Q, {"from": "gpt", "value": 3}]}, "text not a string: message 1 has a int"),
    "null value": ({"conversations": [Q, {"from": "gpt", "value": None}]},
                   "text not a string: message 1 has a NoneType"),
    "empty value": ({"conversations": [Q, {"from": "gpt", "value": ""}]}, "bad conversation: message 1 (gpt) is empty"),
    "blank value": ({"conversations": [Q, {"from": "gpt", "value": " \n "}]},
                    "bad conversation: message 1 (gpt) is empty"),
    "reply first": ({"conversations": [A, Q]}, "bad conversation: message 0 is from 'gpt': turns must go"),
    "two questions": ({"conversations": [Q, {"from": "human", "value": "And?"}, A]}, "turns must go"),
    "system not first": ({"conversations": [Q, {"from": "system", "value": "x"}, A]}, "turns must go"),
    "system alone": ({"image": None, "_drop": "image", "conversations": [{"from": "system", "value": "x"}]},
                     "no assistant reply"),
    "no reply": ({"conversations": [Q]}, "no assistant reply"),
    "image without tag": ({"conversations": [{"from": "human", "value": "What?"}, A]},
                          "image tags: 0 <image> tags for 1 images"),
    "two tags one image": ({"conversations": [{"from": "human", "value": "<image><image>"}, A]},
                           "image tags: 2 <image> tags for 1"),
    "tag without image": ({"image": None, "_drop": "image"}, "image tags: 1 <image> tags for 0 images"),
    "image not a name": ({"image": 5}, "bad image field: 'image' must be a file name"),
    "missing image": ({"image": "images/nope.png"}, "missing image: "),
    "not an image": ({"image": "junk.png"}, "unreadable image: "),
    "truncated image": ({"image": "half.png"}, "unreadable image: "),
    "zero-size image": ({"image": "empty.png"}, "empty image file: "),
    "image outside the folder": ({"image": "../outside.png"}, "image outside the folder: '../outside.png' is "),
    "absolute image path": ({"image": "/etc/x.png"}, "image outside the folder: '/etc/x.png' is /etc/x.png, outside "),
    "image in a reply": ({"conversations": [{"from": "human", "value": "What?"},
                                            {"from": "gpt", "value": "<image> red"}]},
                         "cannot hold"),
    "box outside": ({"image_w": 48, "image_h": 48, "box_x1y1x2y2": [[[50, 10, 60, 20]], []]},
                    "box outside the image: [50, 10, 60, 20] in 48x48"),
    "box inverted": ({"image_w": 48, "image_h": 48, "box_x1y1x2y2": [[[20, 10, 10, 20]], []]},
                     "bad box: [20, 10, 10, 20] is not"),
    "placeholder without boxes": ({"conversations": [{"from": "human",
                                                      "value": "<image>\nWhat is <bbox_location0>?"}, A]},
                                  "bad placeholder: <bbox_location{i}> in a record without box_x1y1x2y2"),
    "regions on two images": ({"image": ["images/train_000000.png", "images/train_000001.png"], "image_w": 48,
                               "image_h": 48, "box_x1y1x2y2": [[], []],
                               "conversations": [{"from": "human", "value": "<image> <image>"}, A]},
                              "regions on 2 images"),
    "box without size": ({"box_x1y1x2y2": [[[1, 1, 2, 2]], []]}, "bad box: boxes given without a positive image_w"),
    "boxes not per message": ({"image_w": 48, "image_h": 48, "box_x1y1x2y2": [[[1, 1, 2, 2]]]},
                              "bad box: box_x1y1x2y2 (and masks) must hold a list per message"),
    "placeholder without box": ({"image_w": 48, "image_h": 48, "box_x1y1x2y2": [[[1, 1, 9, 9]], []],
                                 "conversations": [{"from": "human",
                                                    "value": "<image>\nWhat is <bbox_location1>?"}, A]},
                                "bad placeholder: <bbox_location1> in message 0, which has 1 boxes"),
    "bad segmentation": ({"image_w": 48, "image_h": 48, "box_x1y1x2y2": [[[1, 1, 9, 9]], []],
                          "masks": [[{"size": [48, 48], "counts": [5, 3]}], []],
                          "conversations": [{"from": "human", "value": "<image>\nWhat is <bbox_location0>?"}, A]},
                         "bad segmentation: its runs cover 8 pixels, not 48 x 48"),
    "boxes in another frame": ({"image_w": 96, "image_h": 48, "box_x1y1x2y2": [[[1, 1, 9, 9]], []]},
                               "image size: the boxes are given in 96x48, the file is 48x48"),
    "region token in the text": ({"conversations": [{"from": "human", "value": "<image>\nWhat is <region_fea>?"}, A]},
                                 "region token in the text"),
    "regions without image": ({"image": None, "_drop": "image", "image_w": 48, "image_h": 48, "box_x1y1x2y2": [[], []],
                               "conversations": [{"from": "human", "value": "What?"}, A]}, "regions on 0 images"),
    "sharegpt content list": ({"_drop": "conversations",
                               "messages": [{"role": "user", "content": [{"text": "<image>"}]},
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


def test_an_image_that_changes_between_two_runs_is_checked_again(tokenizer, shapes, tmp_path):
    """data.image_size checks a file once per version: an image broken after a run that read it is a skip in the
    next run, not a size remembered from the first."""
    (tmp_path / "images").mkdir()
    for name in ("train_000000.png", "train_000001.png"):
        (tmp_path / "images" / name).write_bytes((shapes / "images" / name).read_bytes())
    image = tmp_path / "images" / "train_000000.png"
    path = tmp_path / "data.json"
    other = {**GOOD, "id": "other", "image": "images/train_000001.png"}
    path.write_text(json.dumps([GOOD, {**GOOD, "id": "good2"}, other]))
    assert shards(tmp_path, tokenizer, path, tmp_path, name="before").skipped == 0
    broken_png(image, shapes)
    d = shards(tmp_path, tokenizer, path, tmp_path, name="after")
    assert d.skipped == 2 and all("unreadable image: " in s["reason"] for s in skipped(d))


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
        preprocess(str(tmp_path / "mine" / "precious.json"), str(shapes), str(tmp_path / "mine"), tokenizer,
                   "vicuna_v1", 4, num_proc=1, quiet=True)
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


def test_an_image_shown_twice_by_its_template_is_in_the_sample_twice(shapes, tokenizer, tmp_path):
    both, records = "vicuna_v1_image_both", json.loads((shapes / "questions.json").read_text())[:4]
    (tmp_path / "q.json").write_text(json.dumps(records))
    d = shards(tmp_path, tokenizer, tmp_path / "q.json", shapes, num_image_tokens=5, version=both)
    assert len(d) == len(records)
    for i, r in enumerate(records):
        ids, labels = tokenize(both, r["conversations"], tokenizer, 5)
        s, img = d[i], load_image(str(shapes / r["image"]), "pad", 32, CLIP_MEAN, CLIP_STD)
        assert s["input_ids"].tolist() == ids and s["labels"].tolist() == labels
        assert (s["input_ids"] == d.image_id).sum() == 10 and torch.equal(s["pixel_values"], torch.stack([img, img]))


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
    assert (text.startswith("<s>Be brief. USER: Hi ASSISTANT: Hello</s>")
            and d[3]["pixel_values"].shape == (0, 3, 32, 32))
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
    for f in ("ids.bin", "trained.bin", "offsets.npy", "lengths.npy", "sources.npy", "image_index.npy", "images.npy",
              "skipped.jsonl"):
        assert open(os.path.join(one.path, f), "rb").read() == open(os.path.join(two.path, f), "rb").read(), f
    assert one.manifest == two.manifest


def test_images_outside_their_folder_are_skipped_unless_allowed(shapes, tokenizer, tmp_path):
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    os.symlink(shapes / "images", folder / "images")  # a link inside the folder is the folder's: allowed
    (tmp_path / "outside.png").write_bytes((shapes / "images" / "train_000000.png").read_bytes())
    outside = ["../outside.png", str(tmp_path / "outside.png"), "sub/../../outside.png"]
    path = tmp_path / "d.json"
    path.write_text(json.dumps([GOOD] + [{**GOOD, "id": f"out{i}", "image": n} for i, n in enumerate(outside)]
                               + [{**GOOD, "id": "in", "image": "sub/../images/train_000001.png"}]))
    d = shards(tmp_path, tokenizer, path, folder)
    assert len(d) == 2 and d.skipped == 3 and d.manifest["skipped_by_kind"] == {"image outside the folder": 3}
    for s, name in zip(skipped(d), outside):
        assert s["reason"] == (f"image outside the folder: {name!r} is {tmp_path / 'outside.png'}, outside {folder} "
                               "(allow_outside_images=True reads it)"), s
    allowed = shards(tmp_path, tokenizer, path, folder, name="allowed", allow_outside_images=True)
    assert len(allowed) == 5 and allowed.skipped == 0 and allowed.manifest["allow_outside_images"] is True
    assert torch.equal(allowed[1]["pixel_values"], d[0]["pixel_values"])  # the same picture, read from outside
    assert len(shards(tmp_path, tokenizer, path, folder, name="allowed")) == 2  # a setting of the shards: made again


def damage(f, how):
    """Damage a shard file -> what the error should say of it."""
    size = os.path.getsize(f)
    if how == "half":
        os.truncate(f, size // 2)
        return f"holds {size // 2} bytes, but should hold {size}"
    if how == "a byte more":
        with open(f, "ab") as fh:
            fh.write(b"x")
        return f"holds {size + 1} bytes, but should hold {size}"
    if how == "an entry fewer":
        a = np.load(f)
        np.save(f, a[:-1])
        return f"holds {len(a) - 1} "
    os.truncate(f, size - 4)  # "cut short": less data than its header says
    return "not a readable array"


@pytest.mark.parametrize("name, how", [("ids.bin", "half"), ("trained.bin", "half"), ("regions.bin", "a byte more"),
                                       ("lengths.npy", "an entry fewer"), ("sources.npy", "an entry fewer"),
                                       ("offsets.npy", "an entry fewer"), ("image_index.npy", "an entry fewer"),
                                       ("region_offsets.npy", "an entry fewer"), ("images.npy", "an entry fewer"),
                                       ("offsets.npy", "cut short")])
def test_shard_files_that_disagree_with_the_manifest_are_refused_naming_the_file(shapes, tokenizer, tmp_path, name,
                                                                                  how):
    # half of ids.bin used to train until a batch reached the cut, then fail in numpy, naming no file
    path = tmp_path / "d.json"
    path.write_text(json.dumps([GOOD, {**GOOD, "id": "g2"}, {**GOOD, "id": "g3"}]))
    d = shards(tmp_path, tokenizer, path, shapes)
    f = os.path.join(d.path, name)
    said = damage(f, how)
    with pytest.raises(ValueError) as e:
        ShardDataset(d.path, 32, CLIP_MEAN, CLIP_STD)
    msg = str(e.value)
    assert msg.startswith(f"{f} ") or msg.startswith(f"{f}:"), msg
    assert said in msg and f"remake the shards: delete {d.path} and run again, or python data.py --out={d.path}" in msg


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
    batches = epoch_batches(np.zeros(n, int), B, seed=1, epoch=3, lengths=lengths if grouped else None,
                            has_image=has_image)
    assert len(batches) == steps_per_epoch(n, B)  # grouped too: the two kinds' remainders share batches
    ranks = per_rank(batches, micro, accum, world)
    seen = [i for p in ranks for b in p for i in b if i >= 0]
    assert sorted(seen) == list(range(n))  # exactly once, across all ranks
    for p in ranks:
        for b in p:  # a micro-batch is real records, or one stand-in (~i) where the last batch ran short
            assert b and (min(b) >= 0 or (len(b) == 1 and b[0] < 0))
    for s, chunk in enumerate(batches):
        if len(chunk) == B:  # a full global batch: micro records per micro-batch, no stand-ins
            assert all(len(p[s * accum + k]) == micro and min(p[s * accum + k]) >= 0
                       for p in ranks for k in range(accum))


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
    # source 2: no records
    assert sorted(epoch_order(sources, seed=1, epoch=0, multiples=[1, 1, 3]).tolist()) == list(range(15))


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




def test_a_source_that_loses_most_of_its_records_stops_preprocessing(shapes, tokenizer, tmp_path):
    """One of two image folders wrong: its records are all skipped, and the run stops instead of training on
    the other file alone; a source that loses a few is fine, unless more than max_skipped."""
    records = json.loads((shapes / "train.json").read_text())[:10]
    (tmp_path / "a.json").write_text(json.dumps(records))
    (tmp_path / "b.json").write_text(json.dumps(records[:9] + [{**records[9], "image": "images/none.png"}]))
    data = f"{tmp_path}/a.json,{tmp_path}/b.json"
    with pytest.raises(ValueError, match=r"b.json: no usable record, all 10 skipped \(is its image folder .*wrong "
                                         r"right\?\)"):
        preprocess(data, f"{shapes},{tmp_path}/wrong", str(tmp_path / "s1"), tokenizer, "vicuna_v1", 4, num_proc=1,
                   quiet=True)
    manifest = preprocess(data, str(shapes), str(tmp_path / "s2"), tokenizer, "vicuna_v1", 4, num_proc=1, quiet=True)
    assert manifest["records_per_source"] == [10, 9] and manifest["skipped_per_source"] == [0, 1]
    with pytest.raises(ValueError, match="b.json: 1 of its 10 records skipped, more than max_skipped=0.05"):
        preprocess(data, str(shapes), str(tmp_path / "s2"), tokenizer, "vicuna_v1", 4, num_proc=1, quiet=True,
                   max_skipped=0.05)  # shards already made are checked too


# fuzz: whatever a JSON file holds, each record is kept or skipped with a reason, never a crash -------------

import data  # noqa: E402

_text = st.one_of(st.text(max_size=40), st.sampled_from(["", "x" * 5000, "<image>\nWhat is it?", "<image><image>",
                                                         "It is at <bbox_location0>.", "<region_fea>", "\x00\ud7ff"]))
_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | _text,
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                                 max_size=4), max_leaves=10)
_role = st.sampled_from(["human", "gpt", "system", "user", "assistant", "robot", None, 3])
_message = st.fixed_dictionaries({}, optional={"from": _role, "role": _role, "value": _text | _json,
                                               "content": _text | _json})
_image = st.sampled_from(["good.png", "noise.png", "empty.png", "cut.png", "missing.png", "../good.png", "/good.png"])
_record = st.one_of(_json, st.fixed_dictionaries({}, optional={
    "id": _json, "image": _image | st.lists(_image, max_size=2) | _json,
    "conversations": st.lists(_message, max_size=4) | _json, "messages": st.lists(_message, max_size=3),
    "box_x1y1x2y2": st.lists(st.lists(st.lists(st.integers(-5, 60), max_size=5), max_size=2), max_size=4) | _json,
    "image_w": st.integers(-1, 60) | _json, "image_h": st.integers(-1, 60) | _json, "masks": _json}))


@pytest.fixture(scope="module")
def fuzz_folder(tmp_path_factory):
    """Images good and bad: a real PNG, random bytes, an empty file, a PNG cut short; and a real one outside."""
    folder = tmp_path_factory.mktemp("fuzz") / "images"
    folder.mkdir()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(folder / "good.png")
    Image.new("RGB", (40, 30), (200, 10, 10)).save(folder.parent / "good.png")  # '../good.png': a skip
    (folder / "noise.png").write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    (folder / "empty.png").write_bytes(b"")
    (folder / "cut.png").write_bytes((folder / "good.png").read_bytes()[:60])
    return folder


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(record=_record)
def test_any_record_is_kept_or_skipped_with_a_reason(tokenizer, fuzz_folder, record):
    data._worker.update(tokenizer=tokenizer, folders=[str(fuzz_folder)], templates=["vicuna_v1"], num_image_tokens=4,
                        max_len=64, regions={"add_region_feature": False, "no_coor": False,
                                             "point_input_sample": "center"}, allow_outside_images=False)
    _, _, _, result, _ = data.prepare_item((0, "fuzz.json:0", record))
    if isinstance(result, Skip):  # 'kind' or 'kind: details', as the summary counts them
        assert str(result).split(":")[0].strip(), result
    else:
        ids, trained, paths, _ = result
        assert len(ids) == len(trained) and trained.any() and len(ids) <= 64 + len(paths) * 4
        assert all(os.path.commonpath([p, str(fuzz_folder)]) == str(fuzz_folder) for p in paths)


def test_no_shapes_conversation_gives_an_answer_away(shapes):
    """A turn that names a shape or color present in the image (in its question or answer) shares it with no
    other turn of the conversation: otherwise 'Is there a red circle?' would tell 'What color is the circle?'
    asked after it, and the model could copy the answer instead of reading it off the image."""
    words = {"circle", "square", "triangle", "red", "green", "blue", "yellow", "purple", "orange"}
    for name in ("train.json", "val.json"):
        records = json.loads((shapes / name).read_text())
        captions = {r["id"][:-len("_caption")]: r["conversations"][1]["value"] for r in records
                    if r["id"].endswith("_caption")}
        chats = [r for r in records if not r["id"].endswith("_caption")]
        assert len(chats) == len(captions) and sum(len(r["conversations"]) > 2 for r in chats) > len(chats) / 2
        for r in chats:
            present = words & set(re.findall(r"\w+", captions[r["id"]]))
            msgs = r["conversations"]
            named = [words & set(re.findall(r"\w+", q["value"] + " " + a["value"])) & present
                     for q, a in zip(msgs[::2], msgs[1::2])]
            assert all(not (a & b) for i, a in enumerate(named) for b in named[i + 1:]), (r["id"], msgs)


def test_shapes_colors_ask_the_color_of_a_shape_in_the_image(shapes):
    """colors.json: one turn per train image of 2-3 shapes, "What color is the <shape>?" of a shape the image holds,
    answered with that object's color as its caption names it (captions.json's images of several shapes, in its
    order: with one shape, naming the image's one color would be right without binding it to the shape)."""
    colors, captions = (json.loads((shapes / f).read_text()) for f in ("colors.json", "captions.json"))
    captions = [c for c in captions if " and " in c["conversations"][1]["value"]]
    assert [r["image"] for r in colors] == [r["image"] for r in captions]
    asked = set()
    for r, c in zip(colors, captions):
        (q, a), caption = r["conversations"], c["conversations"][1]["value"]
        shape = re.fullmatch(r"<image>\nWhat color is the (\w+)\?", q["value"]).group(1)
        assert f"{a['value']} {shape}" in caption, (r, caption)
        asked.add(shape)
    assert asked == {"circle", "square", "triangle"}


def test_shapes_questions_are_train_jsons_questions_one_per_record(shapes):
    """questions.json: every question of train.json (its conversations' turns and the caption records), in order,
    each a conversation of its own about the same image, with the image tag in it."""
    questions, train = (json.loads((shapes / f).read_text()) for f in ("questions.json", "train.json"))
    want = [(r["image"], q["value"].replace("<image>\n", ""), a["value"])
            for r in train for q, a in zip(r["conversations"][::2], r["conversations"][1::2])]
    got = []
    for r in questions:
        q, a = r["conversations"]
        assert q["value"].startswith("<image>\n") and q["value"].count("<image>") == 1, r
        got.append((r["image"], q["value"].replace("<image>\n", ""), a["value"]))
    assert got == want and len({r["id"] for r in questions}) == len(questions)
