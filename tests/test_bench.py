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
