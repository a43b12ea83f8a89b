"""Ferret through train.py, eval.py, sample.py and export.py on the tiny model and the shapes fixture's GRIT
records: regions in, boxes out; batches that mix records with regions, without, and without images train
alike on 1 and 2 processes (DDP and FSDP); the evaluation's referring and grounding types; a region drawn
by sample.py; and export refused for a model Llava cannot hold."""
import json
import sys

import pytest
from conftest import run_script
from safetensors.torch import load_file
from test_distributed import compare

from model import load

# a small sampler for the tiny CLIP's 4 x 4 feature map
FERRET = dict(add_region_feature=True, sampler_num_init_point=16, sampler_num_sub_point=(8, 4), sampler_num_neighbor=(4, 4),
              point_input_sample="center", image_aspect_ratio="square_nocrop")


@pytest.fixture(scope="module")
def mixed(shapes, tmp_path_factory):
    """GRIT records with regions, LLaVA conversations without, and text-only records, in one file."""
    grit = json.loads((shapes / "ferret_train.json").read_text())[:12]
    plain = json.loads((shapes / "train.json").read_text())[:6]
    text = [{"id": f"t{i}", "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "hi"}]} for i in range(4)]
    path = tmp_path_factory.mktemp("mixed") / "mixed.json"
    path.write_text(json.dumps(grit + plain + text))
    return path


@pytest.fixture(scope="module")
def ferret_run(train, shapes, tmp_path_factory):
    return train(tmp_path_factory.mktemp("ferret"), data_path=shapes / "ferret_train.json", val_data_path=shapes / "ferret_val.json",
                 eval_data_path=shapes / "ferret_val_questions.json", max_iters=4, eval_interval=4, **FERRET)


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
    common = dict(data_path=shapes / "ferret_train.json", val_data_path="", eval_data_path="", max_iters=4, eval_interval=2,
                  keep_last=2, **FERRET)
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
    common = dict(data_path=mixed, val_data_path=mixed, eval_data_path="", max_iters=6, batch_size=4, eval_interval=3, **FERRET)
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
        assert Image.open(out).convert("RGB").getpixel(at) == (40, 80, 255)  # the box's edge, the point: in blue


def test_answer_boxes_are_drawn_where_the_grid_puts_them(shapes, tmp_path):
    from PIL import Image

    from sample import draw
    draw(shapes / "images" / "val_000000.png", None, "It is at [500, 250, 999, 750].", tmp_path / "a.png")
    drawn = Image.open(tmp_path / "a.png").convert("RGB")  # 48 x 48: x 24-47, y 12-36
    assert drawn.getpixel((24, 20)) == drawn.getpixel((35, 12)) == (255, 40, 40)


def test_export_refuses_a_model_with_a_region_sampler(ferret_run, tmp_path):
    proc = run_script([sys.executable, "export.py", f"--out_dir={ferret_run.out_dir}", f"--hf_dir={tmp_path / 'hf'}"], check=False)
    assert proc.returncode != 0 and "region sampler" in proc.stderr


def test_a_ferret_run_needs_a_model_built_with_its_sampler(train, ferret_run, shapes, tmp_path):
    from conftest import train_args
    proc = run_script([sys.executable, "train.py"] + train_args(shapes, tmp_path / "x", init_from=ferret_run.out_dir / "ckpt-0000004"),
                      check=False)
    assert proc.returncode != 0 and "add_region_feature=False, but the model" in proc.stderr
