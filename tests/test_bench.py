"""bench.py's throughput comparison and the GPU script, at a tiny size on the CPU: what a CPU can run of them runs
(the figures are BENCHMARKS.md's, from full-size runs; nothing here asserts a speed)."""
import re

from conftest import TINY_TOWER

import bench

TINY_QWEN2 = dict(bench.QWEN2_05B, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=1000)
TINY = dict(micro_batch=4, steps=1, llm_layers=1, tower_layers=1, scale=16, llm=TINY_QWEN2, tower=TINY_TOWER)


def test_the_gpu_script_runs_on_a_cpu_what_a_cpu_can(tmp_path, capsys):
    """Its train.py runs but flex_attention and compile (their compilation takes minutes on a CPU), in float32 on
    gloo, then the throughput comparison, all at a tiny size."""
    runs = [(name, settings) for name, settings in bench.GPU_RUNS
            if "attn_implementation" not in settings and "compile" not in settings]
    assert {settings["parallel"] for _, settings in runs} == {"ddp", "fsdp"}
    bench.bench_gpu(llm=dict(TINY_QWEN2, num_hidden_layers=2), tower=dict(TINY_TOWER, model_type="siglip_vision_model"),
                    steps=2, images=12, batch_size=4, max_len=256, dtype="float32", runs=runs, throughput=TINY,
                    folder=str(tmp_path))
    out = capsys.readouterr().out
    assert "failed" not in out, out
    for name, _ in runs:
        assert re.search(rf"^\| {re.escape(name)} \| \d+ \(\d+\) \| \d+% \| [\d.e+-]+ \| -% \| [\d.]+ GiB \|", out,
                         re.M), out
    assert re.search(r"AdamW step, foreach: [\d.]+ s", out) and re.search(r"AdamW step, fused: [\d.]+ s", out)
    for name in ("transformers", "glimpse padded", "glimpse grouped", "glimpse packed"):
        assert re.search(rf"^\| {name} \| \d+ \| [\d.]+ s \| [\d.]+% \| [\d.]+ GiB \(cpu\) \|$", out, re.M), out
        assert re.search(rf"^{name}: [\d.]+x the transformers baseline in trained tokens/s, padding [\d.]+%", out,
                         re.M), out
    padding = {m[1]: float(m[2]) for m in re.finditer(r"^(.+?): [\d.]+x .*padding ([\d.]+)%", out, re.M)}
    assert padding["glimpse packed"] < padding["glimpse padded"] == padding["transformers"]


def test_readout_pools_as_named():
    """bench_readout's readouts of a 3 x 3 map, one channel: a single hot patch in the corner."""
    import torch
    features = torch.zeros(1, 9, 1)
    features[0, 0, 0] = 9.0
    inside = torch.tensor([[True, True, False, False, False, False, False, False, False]])
    pooled = {kind: bench.readout_pool(features, kind, inside, (3, 3)).item()
              for kind in ("max", "mean", "object mean", "mean of 3x3 max")}
    # the hot patch reaches its 3 neighbours and itself through the 3 x 3 max: 4 of 9 patches hold 9
    assert pooled == {"max": 9.0, "mean": 1.0, "object mean": 4.5, "mean of 3x3 max": 4.0}


def test_readout_bench_runs_on_the_shapes_fixture(shapes, capsys):
    bench.bench_readout(data=str(shapes), steps=2, every=1, n_train=96)
    out = capsys.readouterr().out
    for kind in ("per patch", "max", "mean", "object mean", "mean of 3x3 max"):
        assert re.search(rf"^\| {kind} \| (0|1)\.\d{{3}} \| (0|1)\.\d{{3}} \|$", out, re.M), out


def test_binding_is_read_off_the_pair_scores():
    """Two images, 2 colors x 2 shapes: the best color for each object's shape, and the best shape for its color."""
    import torch
    scores = torch.tensor([[5.0, 0.0, 0.0, 4.0],  # image 0 holds (color 0, shape 0) and (color 1, shape 1): both read
                           [0.0, 3.0, 2.0, 4.0]])  # image 1 holds (color 1, shape 0): its color reads, its shape not
    objects = [[(0, 0), (1, 1)], [(1, 0)]]
    assert bench.read_binding(scores, objects, n_shapes=2) == (1.0, 2 / 3)


def test_binding_bench_runs_and_saves_a_tower_train_py_reads(shapes, tmp_path, capsys):
    from model import VisionTower
    bench.bench_binding(data=str(shapes), steps=2, every=1, n_train=32, save=str(tmp_path / "tower"))
    out = capsys.readouterr().out
    assert re.search(r"^\| 2 \| (0|1)\.\d{3} \| (0|1)\.\d{3} \|$", out, re.M), out
    assert VisionTower(str(tmp_path / "tower"), select_layer=-1).num_tokens == 36
