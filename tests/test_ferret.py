"""Ferret: ferret.py's GRIT records (placeholders, boxes, points, COCO masks) and region sampler, region masks
through the image transforms (data.region_mask), and Ferret through train.py, eval.py, sample.py and
export.py on the tiny model and the shapes fixture's GRIT records: regions in, boxes out; batches that mix
records with regions, without, and without images train alike on 1 and 2 processes (DDP and FSDP); the
evaluation's referring and grounding types; a region drawn by sample.py; and export refused for a model
Llava cannot hold."""
import json
import re
import sys

import numpy as np
import pytest
import torch
from conftest import run_script
from PIL import Image
from safetensors.torch import load_file
from test_data import CLIP_MEAN, CLIP_STD, GOOD, shards
from test_distributed import compare
from test_model import TOWERS, get_batch, make_model

from checkpoint import load
from conversation import BOX, IGNORE_INDEX, REGION_TOKEN
from data import ShardDataset, collate, fit, fit_xy, region_mask
from ferret import (BadRegion, RegionSampler, decode_segment, farthest_points, features_at, place_regions, sample_point,
                    sample_points)
from model import VisionTower

# a small sampler for the tiny CLIP's 4 x 4 feature map
FERRET = dict(add_region_feature=True, sampler_num_init_point=16, sampler_num_sub_point=(8, 4),
              sampler_num_neighbor=(4, 4), point_input_sample="center", image_aspect_ratio="square_nocrop")


@pytest.fixture(scope="module")
def mixed(shapes, tmp_path_factory):
    """GRIT records with regions, LLaVA conversations without, and text-only records, in one file."""
    grit = json.loads((shapes / "ferret_train.json").read_text())[:12]
    plain = json.loads((shapes / "train.json").read_text())[:6]
    text = [{"id": f"t{i}", "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "hi"}]}
            for i in range(4)]
    path = tmp_path_factory.mktemp("mixed") / "mixed.json"
    path.write_text(json.dumps(grit + plain + text))
    return path


@pytest.fixture(scope="module")
def ferret_run(train, shapes, tmp_path_factory):
    return train(tmp_path_factory.mktemp("ferret"), data_path=shapes / "ferret_train.json",
                 val_data_path=shapes / "ferret_val.json", eval_data_path=shapes / "ferret_val_questions.json",
                 max_iters=4, eval_interval=4, **FERRET)


def test_train_evaluate_and_checkpoint(ferret_run, shapes):
    assert "train: 96 records" in ferret_run.stdout and sorted(ferret_run.steps) == [1, 2, 3, 4]
    results = json.loads((ferret_run.out_dir / "eval.json").read_text())
    assert set(results["n_questions"]) == {"referring", "referring_point", "grounding"}
    assert results["n_questions"]["referring"] == 16
    weights = load_file(str(ferret_run.out_dir / "ckpt-0000004" / "model.safetensors"))
    assert any(k.startswith("region_sampler.stages.1.fuse.") for k in weights)
    model, config = load(ferret_run.out_dir / "ckpt-0000004")
    assert model.region_sampler is not None and config["model"]["sampler_num_sub_point"] == [8, 4]
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(ferret_run.out_dir / "ckpt-0000004")
    assert tok.convert_tokens_to_ids("<region_fea>") == model.region_token_id


def test_exact_resume_with_regions(train, shapes, tmp_path):
    """The sampler draws its points from the RNG that a checkpoint restores: a resumed run continues exactly."""
    common = dict(data_path=shapes / "ferret_train.json", val_data_path="", eval_data_path="", max_iters=4,
                  eval_interval=2, keep_last=2, **FERRET)
    run = train(tmp_path / "run", **common)
    (tmp_path / "resumed").mkdir()
    import shutil
    shutil.copytree(tmp_path / "run" / "ckpt-0000002", tmp_path / "resumed" / "ckpt-0000002")
    resumed = train(tmp_path / "resumed", init_from="resume", **common)
    assert sorted(resumed.steps) == [3, 4] and all(resumed.steps[s] == run.steps[s] for s in (3, 4))


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_mixed_batches_train_alike_on_two_processes(train, mixed, tmp_path, parallel):
    """Records with regions, without, and without images in the same and in different micro-batches: no
    unused-parameter error, no collective out of step, the losses and gradient norms of one process (to
    test_distributed's tolerance, which is what this test is for: on the tiny model the regions' features
    weigh less than that in the loss; where they go is tested in test_data and test_model)."""
    common = dict(data_path=mixed, val_data_path=mixed, eval_data_path="", max_iters=6, batch_size=4, eval_interval=3,
                  **FERRET)
    one = train(tmp_path / "one", **common)
    two = train(tmp_path / "two", nproc=2, parallel=parallel, **common)
    assert "train: 22 records" in one.stdout
    compare(one, two)


def test_sample_takes_a_region_and_draws_it(ferret_run, shapes, tmp_path):
    from PIL import Image
    image = shapes / "images" / "val_000000.png"
    for region, at in (("--box=4,4,30,30", (4, 17)), ("--point=20,20", (20, 20))):
        out = tmp_path / f"{region[2:5]}.png"
        proc = run_script([sys.executable, "sample.py", f"--out_dir={ferret_run.out_dir}", f"--image={image}",
                           "--prompt=What is in <bbox_location0>?", region, f"--out_png={out}", "--max_new_tokens=8"])
        assert "wrote" in proc.stdout
        drawn = Image.open(out).convert("RGB")  # 48 x 48 scaled 11 times (528 px), with the text below
        assert drawn.width == 528 and drawn.height > 528
        assert drawn.getpixel((at[0] * 11 + 1, at[1] * 11)) == (40, 80, 255)  # the box's edge, the point: in blue


def test_sample_draws_a_picture_a_person_can_see(shapes, tmp_path):
    import numpy as np
    from PIL import Image

    from sample import draw
    image = shapes / "images" / "val_000000.png"
    k = draw(image, None, "It is at [500, 250, 999, 750].", tmp_path / "a.png", "Where is the red circle?")
    drawn = np.asarray(Image.open(tmp_path / "a.png").convert("RGB"))
    assert k == 11 and drawn.shape[1] == 528  # the long side at least 512, each pixel a k x k square
    small = np.asarray(Image.open(image).convert("RGB"))
    assert (drawn[:k * 10, :528] == np.repeat(np.repeat(small[:10], k, 0), k, 1)).all()  # the top rows: no box there
    text = drawn[528:]
    assert (text != 255).any(axis=2).any() and (text[:, :, 0] == text[:, :, 2]).all()  # black text on white
    red = (drawn[:528] == (255, 40, 40)).all(axis=2)  # the answer's box, from the grid: x 264-527, y 132-396
    assert red[220, 264] and red[132, 385] and not red[:120].any()
    wide = tmp_path / "wide.png"
    Image.new("RGB", (900, 300), "gray").save(wide)
    assert draw(wide, None, "gray", tmp_path / "b.png", "What color?") == 1  # large enough already


def test_export_refuses_a_model_with_a_region_sampler(ferret_run, tmp_path):
    proc = run_script([sys.executable, "export.py", f"--out_dir={ferret_run.out_dir}", f"--hf_dir={tmp_path / 'hf'}"],
                      check=False)
    assert proc.returncode != 0 and "region sampler" in proc.stderr


def test_a_ferret_run_needs_a_model_built_with_its_sampler(train, ferret_run, shapes, tmp_path):
    from conftest import train_args
    proc = run_script([sys.executable, "train.py"] + train_args(shapes, tmp_path / "x",
                                                                init_from=ferret_run.out_dir / "ckpt-0000004"),
                      check=False)
    assert proc.returncode != 0 and "add_region_feature=False, but the model" in proc.stderr


# GRIT records: regions in, boxes out ---------------------------------------------------------------------

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
    # no_coor: a region in is its token alone (its features carry where it is), a box out is still text (Ferret's
    # code empties it, and a grounding reply with it); without region features, a region in is text only
    msgs, _ = place_regions(SCREEN, messages(SCREEN), rng, no_coor=True, form=form)
    assert msgs[0]["value"].endswith("widget <region_fea>?") and msgs[3]["value"] == "It is at [884, 213, 952, 245]."
    msgs, regions = place_regions(SCREEN, messages(SCREEN), rng, add_region_feature=False, point_input_sample="center",
                                  form=form)
    assert msgs[0]["value"].endswith(f"widget {text}?") and regions == []  # the region's text, as Ferret writes it then


def test_boxes_partly_outside_are_clamped_to_the_image():
    rec = {**SCREEN, "box_x1y1x2y2": [[[-5, 2500, 1200, 2600]], [], [], [[0, 0, 1, 1]]]}
    msgs, regions = place_regions(rec, messages(rec), np.random.default_rng(0), form="box")
    assert (regions[0]["box"] == [0, 2500, 1170, 2532]
            and msgs[0]["value"].endswith("widget [0, 987, 999, 999] <region_fea>?"))


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
    rec = {**SCREEN, "conversations": [{"from": "human",
                                        "value": "<image>\nIs <bbox_location1> left of <bbox_location0>?"},
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


def test_a_point_region_stays_within_its_box():
    region = {"kind": "point", "box": [10, 10, 12, 30], "point": [11, 20], "segment": None}  # a thin box
    mask = region_mask(region, (40, 40), (40, 40), "square_nocrop", 40).numpy()
    assert mask.any() and not mask[:, :10].any() and not mask[:, 13:].any() and mask[15:26, 10:13].all()


def test_a_point_keeps_to_its_object_and_a_point_alone_to_its_square():
    point = {"kind": "point", "box": [10, 10, 12, 30], "point": [11, 20], "segment": None}
    seg = [[8, 15, 19, 15, 19, 25, 8, 25]]  # the object, x 8-19 and y 15-25, reaches left of the thin box
    with_seg = region_mask({**point, "segment": seg}, (40, 40), (40, 40), "square_nocrop", 40).numpy()
    # Ferret's: square x object
    assert np.array_equal(np.nonzero(with_seg.any(0))[0], np.arange(8, 17)) and not with_seg[:15].any()
    # sample.py --point
    alone = region_mask({**point, "box": [11, 20, 11, 20]}, (40, 40), (40, 40), "square_nocrop", 40).numpy()
    # the whole square
    assert alone.sum() > 1 and alone[20, 11] and alone.sum() == (alone.any(0).sum() * alone.any(1).sum())
    cut = region_mask({**point, "box": [0, 0, 100, 50], "point": [2, 25]}, (200, 50), (200, 50), "crop", 50).numpy()
    assert cut.sum() == 1 and cut[25, 0]  # cut away by crop: the point's nearest input pixel, not the box's center's


def test_degenerate_polygons_cover_nothing_and_a_bad_turn_is_a_skip():
    assert decode_segment([[1, 1, 5, 5], [10, 10, 30, 10, 30, 20]], 40, 30)[12, 20]  # the 2-point one is dropped
    assert not decode_segment([[1, 1, 5, 5]], 40, 30).any()
    with pytest.raises(BadRegion, match="not a list"):
        place_regions({"image_w": 10, "image_h": 10, "box_x1y1x2y2": [5]}, [{"from": "human", "value": "hi"}], None,
                      form="box")


def test_no_coor_keeps_every_shapes_record(shapes, region_tokenizer, tmp_path):
    """The shapes grounding replies are a box alone ('<bbox_location0>'): emptied, as Ferret's code does with
    no_coor, every record would be skipped for an empty reply."""
    d = shards(tmp_path, region_tokenizer, shapes / "ferret_train.json", shapes,
               regions=dict(add_region_feature=True, no_coor=True))
    records = json.loads((shapes / "ferret_train.json").read_text())
    assert d.skipped == 0 and len(d) == len(records)
    for i in range(20):  # each record: 1-3 regions in, as their token alone, and one grounding reply, its box
        text = region_tokenizer.decode(d[i]["input_ids"])
        assert "<region_fea>" in text and not re.search(r"\d\] <region_fea>", text), text
        assert len(BOX.findall(text)) == 1 and "ASSISTANT: [" in text, text


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
        ShardDataset(d.path, 32, CLIP_MEAN, CLIP_STD, tokenizer=region_tokenizer, version="vicuna_v1",
                     num_image_tokens=4, model_max_length=2048, regions={**regions, "no_coor": True})


def test_truncation_drops_the_regions_of_the_tokens_it_cuts(shapes, region_tokenizer, tmp_path):
    Image.fromarray(np.zeros((2532 // 20, 1170 // 20, 3), np.uint8)).save(tmp_path / "screen.png")
    long = {**SCREEN, "conversations": [{"from": "human", "value": "<image>\nWhat is <bbox_location0>?"},
                                        {"from": "gpt", "value": "A"},
                                        {"from": "human", "value": "And " * 40 + "<bbox_location0>?"},
                                        {"from": "gpt", "value": "B"}],
            "box_x1y1x2y2": [[[445, 524, 692, 632]], [], [[1035, 540, 1114, 622]], []]}
    (tmp_path / "grit.json").write_text(json.dumps([long]))
    full = shards(tmp_path, region_tokenizer, tmp_path / "grit.json", tmp_path, regions=dict(add_region_feature=True),
                  name="full")
    assert len(full[0]["region_masks"]) == 2
    # keeps the first answer, not the second question
    cut = int(np.flatnonzero(full[0]["labels"] != IGNORE_INDEX)[0]) + 8
    d = shards(tmp_path, region_tokenizer, tmp_path / "grit.json", tmp_path, regions=dict(add_region_feature=True),
               model_max_length=cut)
    assert len(d[0]["input_ids"]) == cut and len(d[0]["region_masks"]) == 1


# the region sampler ------------------------------------------------------------------------------------------

def ferret_model(tokenizer, **overrides):
    tok_id = len(tokenizer)  # <region_fea>, one past the tokenizer's ids
    return make_model(tokenizer, add_region_feature=True, region_token_id=tok_id, vocab_size=len(tokenizer) + 1,
                      sampler_num_init_point=16, sampler_num_sub_point=(8, 4), sampler_num_neighbor=(4, 4), **overrides)


def test_features_are_read_at_x_y_where_the_region_is():
    """A 4 x 8 map (rows x columns) whose channels hold each patch's column and row: a point (x, y) of the
    image reads column x * 8 - 0.5 and row y * 4 - 0.5 (between patch centers, bilinear; clamped at the
    edges). Read transposed, as Ferret's released code does, a point at the top right would get row 7."""
    cols, rows = torch.meshgrid(torch.arange(8.0), torch.arange(4.0), indexing="xy")
    fmap = torch.stack([cols, rows])[None]  # [1, 2, 4, 8]
    xy = torch.tensor([[[0.95, 0.05], [0.5, 0.5], [0.1, 0.9], [0.3, 0.6]]])
    got = features_at(fmap, xy)[0]
    want = torch.stack([(xy[0, :, 0] * 8 - 0.5).clamp(0, 7), (xy[0, :, 1] * 4 - 0.5).clamp(0, 3)], -1)
    torch.testing.assert_close(got, want)
    assert got[0].tolist() == [7.0, 0.0]  # the top right reads the top right


@pytest.mark.parametrize("family", ["clip", "siglip", "dinov2_registers", "convnext"])
def test_the_feature_map_puts_each_patch_where_it_is_in_the_image(family):
    """A white square in the image's top right, black elsewhere: the tower's feature map differs from a
    black image's most in its top right cells (patches see little past their edges in one layer), and not
    in the bottom left, where a transposed map would put them."""
    spec = TOWERS[family][0] if family != "convnext" else dict(model_type="convnext", image_size=32, patch_size=4,
                                                                 num_stages=1, hidden_sizes=[8], depths=[1])
    torch.manual_seed(0)
    tower = VisionTower(spec, -1, "cls_patch").eval()
    img = torch.zeros(1, 3, 32, 32)
    img[:, :, :8, 24:] = 5.0  # rows 0-7, columns 24-31: the top right
    with torch.no_grad():
        diff = (tower.feature_map(tower(img)) - tower.feature_map(tower(torch.zeros_like(img)))).abs().sum(1)[0]
    rows, cols = diff.shape
    assert (diff[0, cols - 1] > 0 and diff[0, cols - 1] == diff.max()
            and diff[rows - 1, 0] < diff.max() / 10), (family, diff)


def test_points_fall_inside_their_mask_at_pixel_centers():
    torch.manual_seed(0)
    masks = torch.zeros(2, 16, 32, dtype=torch.bool)
    masks[0, 2:4, 28:31] = True  # 6 pixels: all of them, then repeats
    masks[1, 8:, :16] = True  # 128 pixels: a sample without repeats
    xy = sample_points(masks, 20)
    assert xy.shape == (2, 20, 2)
    for m, pts in zip(masks, xy):
        cols, rows = pts[:, 0] * 32 - 0.5, pts[:, 1] * 16 - 0.5
        assert torch.equal(cols, cols.round()) and m[rows.long(), cols.long()].all()
    assert len({tuple(p.tolist()) for p in xy[0]}) == 6 and len({tuple(p.tolist()) for p in xy[1]}) == 20
    empty = {"input_ids": torch.ones(3, dtype=torch.long), "labels": torch.ones(3, dtype=torch.long),
             "pixel_values": torch.zeros(1, 3, 4, 4), "region_masks": torch.zeros(1, 4, 4, dtype=torch.bool),
             "region_image": torch.zeros(1, dtype=torch.long)}
    with pytest.raises(ValueError, match="empty region mask"):
        collate([empty], 0)


def test_farthest_points_spread_over_the_region():
    xy = torch.tensor([[[0.5, 0.5], [0.0, 0.0], [0.52, 0.5], [1.0, 1.0], [0.0, 1.0], [0.49, 0.51]]])
    assert farthest_points(xy, 4)[0].tolist() == [0, 1, 3, 4]  # from the first, each the farthest from the rest


def test_relative_positions_keep_a_pixel_in_bf16():
    # under FSDP the sampler's weights are bf16; positions near 0.6 are bf16 to 1/256, more than a 336 px pixel
    sampler = RegionSampler(8, 8, True, num_init_point=64, num_sub_point=(16, 4), num_neighbor=(8, 4),
                            pooler="mean").to(torch.bfloat16)
    seen = []
    sampler.stages[0]["relative"].register_forward_pre_hook(lambda m, a: seen.append(a[0][..., -2:].float()))
    masks = torch.zeros(1, 336, 336, dtype=torch.bool)
    masks[0, 200:208, 200:208] = True
    torch.manual_seed(0)
    sampler(torch.randn(1, 8, 24, 24, dtype=torch.bfloat16), masks)
    pixels = seen[0] * 336  # the neighbours' offsets from their center, in pixels: whole numbers, 0 to 7
    assert ((pixels - pixels.round()).abs().max() < 0.05 and pixels.abs().max() <= 7
            and (pixels.abs().round() == 1).any())


@pytest.mark.parametrize("geo, pooler", [(True, "mean"), (True, "max"), (False, "mean")])
def test_region_sampler_reads_its_region_only_and_is_seeded(geo, pooler):
    sampler = RegionSampler(6, 10, geo, num_init_point=32, num_sub_point=(8, 4), num_neighbor=(6, 3), pooler=pooler)
    torch.manual_seed(1)
    fmap = torch.randn(1, 6, 8, 8)
    other = fmap.clone()
    other[..., 5:, 5:] += 3.0  # another image only in its bottom right
    masks = torch.zeros(2, 32, 32, dtype=torch.bool)
    masks[0, :8, :8] = True  # the top left
    masks[1, 24:, 24:] = True  # the bottom right
    maps = fmap.expand(2, -1, -1, -1)

    def run(m, seed=0):
        torch.manual_seed(seed)
        return sampler(m, masks)
    a = run(maps)
    assert a.shape == (2, 10) and torch.equal(a, run(maps))  # the same under the same seed
    b = run(other.expand(2, -1, -1, -1))
    assert torch.equal(a[0], b[0]) and not torch.allclose(a[1], b[1])  # the top left does not see the change
    # off the diagonal, where a swap of x and y would show: a change in the top right reaches a top-right
    # region and not a bottom-left one
    corner = fmap.clone()
    corner[..., :3, 5:] += 3.0  # rows 0-2, columns 5-7
    masks[0], masks[1] = False, False
    masks[0, :8, 24:], masks[1, 24:, :8] = True, True
    before, after = run(maps), run(corner.expand(2, -1, -1, -1))
    assert not torch.allclose(before[0], after[0]) and torch.equal(before[1], after[1])
    a.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in sampler.parameters())


def test_region_sampler_settings_are_checked():
    with pytest.raises(ValueError, match="sampler_pooler_mode"):
        RegionSampler(4, 4, True, 512, (128, 32), (24, 24), pooler="sum")
    with pytest.raises(ValueError, match="must shrink"):
        RegionSampler(4, 4, True, num_init_point=16, num_sub_point=(32, 8), num_neighbor=(4, 4), pooler="mean")


def test_region_features_are_written_at_region_tokens(shapes, tokenizer):
    model = ferret_model(tokenizer)
    batch = get_batch(shapes, tokenizer, model, n=2)
    ids = batch["input_ids"].clone()
    ids[0, -3], ids[1, -2] = model.region_token_id, model.region_token_id  # a region in each record
    masks = torch.zeros(2, 32, 32, dtype=torch.bool)
    masks[0, :10, :10], masks[1, 20:, 20:] = True, True
    image = torch.tensor([0, 1])
    with torch.no_grad():
        torch.manual_seed(0)
        emb = model.embed(ids, batch["pixel_values"], masks, image)
        torch.manual_seed(0)
        tower = model.vision_tower.feature_map(model.vision_tower(batch["pixel_values"]))
        want = model.region_sampler(tower[image], masks)
    torch.testing.assert_close(emb[0, -3], want[0])
    torch.testing.assert_close(emb[1, -2], want[1])
    with pytest.raises(ValueError, match="2 region tokens but 1 region masks"):
        model.embed(ids, batch["pixel_values"], masks[:1], image[:1])


def test_a_batch_without_regions_still_trains_the_sampler_with_zero_gradients(shapes, tokenizer):
    """As text-only batches do for the projector: the same parameters take part in every step (DDP, FSDP),
    with gradient 0, and the loss is exactly the one without the stand-in."""
    model = ferret_model(tokenizer).train()
    batch = get_batch(shapes, tokenizer, model, n=2)
    loss = model(batch)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().max() == 0 for p in model.region_sampler.parameters())
    with torch.no_grad():
        assert loss.item() == model(batch).item()
