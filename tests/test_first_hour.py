"""The first hour of the README, run as written, and a closer look at what it makes: a real pretrained chat
LLM (SmolLM2-135M-Instruct, converted from its GGUF by data/smollm2/prepare.py) made a VLM by
config/shapes_smollm2.py, saved, loaded, asked, and exported to transformers' LLaVA.

first_hour runs every line of the section's ```bash blocks, in order, then its ```python block, in a folder
that holds the repository's files, with the shapes fixture as data/shapes and the converted SmolLM2 as
data/smollm2/model. Only the size is reduced: each train.py command gets SMALL appended and runs 4 steps (the
SmolLM2 recipe 2 in each stage). A block fenced without a language (the GPU recipes) is not
run. Marked real_llm: `pytest -m "not real_llm"` leaves these out locally; CI runs them."""
import json
import math
import os
import re
import shlex
import subprocess
import sys

import pytest
import torch
from conftest import REPO, script_module
from safetensors.torch import load_file
from transformers import AutoTokenizer

pytestmark = pytest.mark.real_llm
SMALL = ["--eval_interval=2", "--batch_size=4", "--log_interval=1", "--eval_iters=1", "--eval_subset=0",
         "--eval_final=2", "--warmup_iters=1", "--keep_last=2", "--tower_iters=2"]


def first_hour_section():
    text = (REPO / "README.md").read_text()
    start = text.index("\n## The first hour\n")
    return text[start:text.index("\n## ", start + 1)]


def commands(section):
    lines = [line.strip() for block in re.findall(r"```bash\n(.*?)```", section, re.S) for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def sandbox(root, shapes, smollm2):
    """root: the repository's files (linked), the shapes fixture as data/shapes, SmolLM2 as data/smollm2/model."""
    for p in REPO.iterdir():
        if p.name not in ("data", "tests") and not p.name.startswith((".", "out", "__")):
            (root / p.name).symlink_to(p)
    (root / "data" / "smollm2").mkdir(parents=True)
    (root / "data" / "shapes").symlink_to(shapes)
    (root / "data" / "smollm2" / "prepare.py").symlink_to(REPO / "data" / "smollm2" / "prepare.py")
    (root / "data" / "smollm2" / "model").symlink_to(smollm2)


def reduced(cmd, shapes):
    """A train.py command at 4 steps of 4 records (the SmolLM2 recipe: 2 in each stage, its epoch)."""
    if cmd[1] != "train.py":
        return cmd
    if "config/shapes_smollm2.py" not in cmd:
        return cmd + SMALL + ["--max_iters=4"]
    n = [len(json.loads((shapes / f).read_text())) for f in ("captions.json", "train.json")]
    return cmd + SMALL + [f"--data_multiple={8 / n[0]:.6f},{8 / n[1]:.6f}"]


@pytest.fixture(scope="module")
def first_hour(shapes, smollm2, tmp_path_factory):
    """The folder it ran in, and {command as written: its finished process}, the Python block under 'python'."""
    root = tmp_path_factory.mktemp("first-hour")
    sandbox(root, shapes, smollm2)
    section = first_hour_section()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    runs = {}
    for line in commands(section):
        cmd = reduced(shlex.split(line), shapes)
        assert cmd[0] == "python", line
        runs[line] = subprocess.run([sys.executable] + cmd[1:], cwd=root, capture_output=True, text=True, env=env,
                                    timeout=900)
        assert runs[line].returncode == 0, f"{line}\n{runs[line].stdout[-3000:]}\n{runs[line].stderr[-5000:]}"
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    runs["python"] = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, env=env,
                                    timeout=300)
    assert runs["python"].returncode == 0, runs["python"].stderr[-5000:]
    return root, runs


def test_every_command_of_the_first_hour_runs(first_hour):
    root, runs = first_hour
    lines = commands(first_hour_section())
    assert [c.split()[1] for c in lines] == ["train.py", "plot.py", "sample.py", "eval.py", "train.py",
                                            "data/smollm2/prepare.py", "train.py", "sample.py", "export.py"]
    for out_dir in ("out-shapes", "out-shapes-lora", "out-shapes-smollm2"):
        assert (root / out_dir / "eval.json").exists() and (root / out_dir / "curves.png").exists(), out_dir
    assert (root / "answer.png").exists() and (root / "smollm2-llava" / "config.json").exists()
    assert "color" in runs["python eval.py --out_dir=out-shapes"].stdout
    assert runs["python"].stdout.strip()  # transformers' answer, whatever a 4-step model says


def test_the_converted_llm_is_an_ordinary_folder_that_checks_itself(smollm2, monkeypatch):
    config = json.loads((smollm2 / "config.json").read_text())
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"], config["tie_word_embeddings"]) \
        == ("llama", 30, 576, True)
    tok = AutoTokenizer.from_pretrained(smollm2)
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")  # ChatML
    prepare = script_module("data/smollm2/prepare.py")
    monkeypatch.setattr(prepare, "CHECK", (prepare.CHECK[0], prepare.CHECK[1] + " streets"))
    with pytest.raises(RuntimeError, match="continues as"):  # what the check does with a wrong conversion
        prepare.check(smollm2)


def test_both_stages_train_and_the_llm_is_frozen_in_the_first(first_hour, smollm2):
    root, _ = first_hour
    out = root / "out-shapes-smollm2"
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[0]["stage_starts"] == [0, 2]
    train = {r["step"]: r["train/loss"] for r in log if "train/loss" in r}
    val = {r["step"]: r["val/loss"] for r in log if "val/loss" in r}
    assert sorted(train) == [1, 2, 3, 4] and all(math.isfinite(v) for v in train.values())
    assert train[2] < train[1] and train[4] < train[3]  # it falls within each stage (5.33 -> 4.74, 3.50 -> 2.57)
    assert val[4] < val[2]  # and so does the conversations' val loss, over stage 1
    stage0, stage1 = (load_file(str(out / f"ckpt-{s:07d}" / "model.safetensors")) for s in (2, 4))
    lora_b = [k for k in stage0 if "lora_B" in k]
    assert len(lora_b) == 210 and all(not stage0[k].any() for k in lora_b)  # adapters as they started: B = 0
    assert all(stage1[k].any() for k in lora_b)
    tower = [k for k in stage0 if k.startswith("vision_tower.")]
    assert any(not stage0[k].equal(stage1[k]) for k in tower)  # the tower trains in both
    base = load_file(str(smollm2 / "model.safetensors"))  # LoRA's base is SmolLM2's own
    ours = load_file(str(out / "base" / "model.safetensors"))
    assert ours["llm.model.layers.7.mlp.down_proj.weight"].equal(base["model.layers.7.mlp.down_proj.weight"])


def test_the_trained_vlm_loads_answers_and_keeps_its_language(first_hour):
    _, runs = first_hour
    (line,) = [c for c in runs if "capital of France" in c]
    assert "Paris" in runs[line].stdout


def test_the_export_answers_as_glimpse_does(first_hour):
    """The README's few lines of transformers (LlavaForConditionalGeneration, AutoProcessor, the exported
    chat template) give the greedy answer glimpse's sample.ask gives for the same image and question."""
    from checkpoint import load, newest
    from conversation import chat_template
    from sample import ask, image_args
    root, runs = first_hour
    ckpt = newest(root / "out-shapes-smollm2")
    model, config = load(ckpt)
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    with torch.no_grad():
        (ours,) = ask(model.eval(), tokenizer, chat_template(config["train"]["version"]),
                      image_args(model, config["train"]), [str(root / "data/shapes/images/val_000000.png")],
                      ["What color is the triangle?"], max_new_tokens=16)
    assert runs["python"].stdout.strip() == ours
