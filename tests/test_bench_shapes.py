"""bench_shapes.py's measurements at a tiny size, on the shapes fixture: they run and print their tables, and their
helpers compute what they say (the figures are BENCHMARKS.md's)."""
import os
import re
import subprocess
import sys

from conftest import REPO

import bench_shapes


def test_readout_pools_as_named():
    """bench_readout's readouts of a 3 x 3 map, one channel: a single hot patch in the corner."""
    import torch
    features = torch.zeros(1, 9, 1)
    features[0, 0, 0] = 9.0
    inside = torch.tensor([[True, True, False, False, False, False, False, False, False]])
    pooled = {kind: bench_shapes.readout_pool(features, kind, inside, (3, 3)).item()
              for kind in ("max", "mean", "object mean", "mean of 3x3 max")}
    # the hot patch reaches its 3 neighbours and itself through the 3 x 3 max: 4 of 9 patches hold 9
    assert pooled == {"max": 9.0, "mean": 1.0, "object mean": 4.5, "mean of 3x3 max": 4.0}


def test_readout_bench_runs_on_the_shapes_fixture(shapes, capsys):
    bench_shapes.bench_readout(data=str(shapes), steps=2, every=1, n_train=96)
    out = capsys.readouterr().out
    for kind in ("per patch", "max", "mean", "object mean", "mean of 3x3 max"):
        assert re.search(rf"^\| {kind} \| (0|1)\.\d{{3}} \| (0|1)\.\d{{3}} \|$", out, re.M), out


def test_binding_is_read_off_the_pair_scores():
    """Two images, 2 colors x 2 shapes: the best color for each object's shape, and the best shape for its color."""
    import torch
    scores = torch.tensor([[5.0, 0.0, 0.0, 4.0],  # image 0 holds (color 0, shape 0) and (color 1, shape 1): both read
                           [0.0, 3.0, 2.0, 4.0]])  # image 1 holds (color 1, shape 0): its color reads, its shape not
    objects = [[(0, 0), (1, 1)], [(1, 0)]]
    assert bench_shapes.read_binding(scores, objects, n_shapes=2) == (1.0, 2 / 3)


def test_binding_bench_runs_and_saves_a_tower_train_py_reads(shapes, tmp_path, capsys):
    from model import VisionTower
    bench_shapes.bench_binding(data=str(shapes), steps=2, every=1, n_train=32, save_tower=str(tmp_path / "tower"))
    out = capsys.readouterr().out
    assert re.search(r"^\| 2 \| (0|1)\.\d{3} \| (0|1)\.\d{3} \|$", out, re.M), out
    assert VisionTower(str(tmp_path / "tower"), select_layer=-1).num_tokens == 36


def test_oracle_features_hold_each_objects_color_and_shape_at_its_patches():
    """A 2 x 2 grid of a 48-px image: patch centers at 12 and 36. One red circle over the top-left patch's center,
    one blue square over both bottom patches' centers; the top-right patch is background."""
    import torch
    from prepare import COLORS, SHAPES
    red, blue = list(COLORS).index("red"), list(COLORS).index("blue")
    circle, square = len(COLORS) + SHAPES.index("circle"), len(COLORS) + SHAPES.index("square")
    background = len(COLORS) + len(SHAPES)
    feats = bench_shapes.oracle_features([("circle", "red", (0, 0, 20, 20)), ("square", "blue", (0, 30, 48, 48))],
                                         grid=2, width=16, size=48)
    assert feats.shape == (4, 16)
    assert [sorted(torch.nonzero(f).flatten().tolist()) for f in feats] == \
        [[red, circle], [background], [blue, square], [blue, square]]


def test_oracle_bench_trains_the_default_llm_and_scores_each_type(shapes, capsys):
    bench_shapes.bench_oracle(data=str(shapes), steps=2, every=1, n_val=4)
    out = capsys.readouterr().out
    accuracy = r" (0|1)\.\d{3} \|"
    assert re.search(rf"^\| 2 \| [\d.]+ \|{accuracy * 4}$", out, re.M), out


def test_bench_py_passes_its_settings_to_the_shapes_benchmarks(tmp_path):
    """bench.py --out_dir reaches bench_probe's argument: an empty folder has no checkpoint to probe."""
    run = subprocess.run([sys.executable, "bench.py", "--what=probe", f"--out_dir={tmp_path}"], cwd=REPO,
                         capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr
    assert f"no checkpoint in {tmp_path}" in run.stdout, run.stdout
