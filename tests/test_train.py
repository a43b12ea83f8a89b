"""train.py end to end (subprocesses on the tiny model and the shapes fixture): training, checkpoints,
exact resume, stages, eval.json, and sample.py / eval.py on the result."""
import json
import math
import re
import shutil
import signal
import subprocess
import sys

import pytest
from conftest import REPO, run_script
from safetensors.torch import load_file


def tensors(ckpt):
    return load_file(str(ckpt / "model.safetensors"))


def part(weights, prefix):
    return {k: v for k, v in weights.items() if k.startswith(prefix)}


def same(a, b):
    return a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


@pytest.fixture(scope="module")
def run_a(train, tmp_path_factory):
    """6 steps, a val loss and a checkpoint every 3 steps, both checkpoints kept."""
    return train(tmp_path_factory.mktemp("run_a"), max_iters=6, eval_interval=3, keep_last=2, eval_data_path="")


@pytest.fixture(scope="module")
def trained(train, tmp_path_factory):
    """150 steps at a high learning rate (the tiny model then answers from the question type), with the
    default keep_last=1 and the eval at the end."""
    return train(tmp_path_factory.mktemp("trained"), max_iters=150, eval_interval=50, warmup_iters=3,
                 learning_rate=1e-2, eval_subset=4)


def test_loss_decreases(trained):
    losses = trained.losses()
    assert sorted(losses) == list(range(1, 151)) and all(math.isfinite(v) for v in losses.values())
    first, mid, last = ([losses[s] for s in range(a, a + 5)] for a in (1, 26, 146))
    # a random init starts near ln(vocab); in 30 steps the loss is down by more than 1 (to about 4.6 here),
    # and after 150 (6.25 epochs of 192 records) to about 1.1
    assert first[0] == pytest.approx(math.log(452), abs=0.5)
    assert all(a > b for a, b in zip(first, first[1:]))  # the first steps go steadily down
    assert sum(mid) / 5 < sum(first) / 5 - 1.0, losses
    assert sum(last) / 5 < sum(first) / 5 / 3, losses
    assert sorted(trained.val) == [50, 100, 150] and trained.val[150][0] < trained.val[50][0] < first[0]


def test_checkpoints_are_complete(run_a, shapes, tokenizer):
    names = sorted(p.name for p in run_a.out_dir.iterdir())
    # no .tmp left behind, no eval.json (eval_data_path=''); data: the shards; the log and its curves
    assert names == ["ckpt-0000003", "ckpt-0000006", "curves.png", "data", "log.jsonl"]
    for step in (3, 6):
        ckpt = run_a.out_dir / f"ckpt-{step:07d}"
        files = {p.name for p in ckpt.iterdir()}
        assert {"config.json", "model.safetensors", "optimizer", "state.json", "tokenizer_config.json"} <= files
        assert "trainable.safetensors" not in files  # only where the LLM is frozen (stage 1)
        assert "tokenizer.json" in files
        state = json.loads((ckpt / "state.json").read_text())
        assert (state["iter"], state["epoch"], state["epoch_step"]) == (step, 0, step)
        config = json.loads((ckpt / "config.json").read_text())
        assert config["train"]["max_iters"] == 6 and config["train"]["batch_size"] == 8
        assert config["model"]["vocab_size"] == len(tokenizer)
        from transformers import AutoTokenizer
        saved = AutoTokenizer.from_pretrained(str(ckpt))
        assert saved.get_vocab() == tokenizer.get_vocab()
    assert run_a.stdout.count("val loss") == 2


def test_keep_last_prunes_old_checkpoints(trained):
    names = ["ckpt-0000150", "curves.png", "data", "eval.json", "log.jsonl"]
    assert sorted(p.name for p in trained.out_dir.iterdir()) == names


def test_checkpoint_loads_and_evaluates_the_same(trained, shapes):
    results = json.loads((trained.out_dir / "eval.json").read_text())
    questions = json.loads((shapes / "val_questions.json").read_text())
    types = {q["type"] for q in questions}
    assert set(results) == types | {"n_questions"}
    assert results["n_questions"] == {t: sum(q["type"] == t for q in questions) for t in types}
    assert all(0.0 <= results[t] <= 1.0 for t in types)
    assert max(results[t] for t in types) > 0  # the trained model gets some answers right
    assert "question type" in trained.stdout
    # eval.py on the saved checkpoint gives what train.py measured on the model in memory
    (trained.out_dir / "eval.json").rename(trained.out_dir / "eval_train.json")
    try:
        run_script([sys.executable, "eval.py", f"--out_dir={trained.out_dir}",
                    f"--eval_data_path={shapes / 'val_questions.json'}", f"--eval_image_folder={shapes}"])
        assert json.loads((trained.out_dir / "eval.json").read_text()) == results
    finally:
        (trained.out_dir / "eval_train.json").replace(trained.out_dir / "eval.json")


def log_entries(out_dir, exact=("train/loss", "lr", "grad_norm", "val/loss", "val/loss_shuffled_images")):
    """out_dir/log.jsonl's lines, with the keys that do not depend on timing (no tokens/s)."""
    lines = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
    return [{"step": e["step"], **{k: e[k] for k in exact if k in e}} for e in lines if set(exact) & set(e)]


def test_the_log_holds_every_number_and_the_curves_are_drawn(trained, shapes):
    lines = [json.loads(line) for line in (trained.out_dir / "log.jsonl").read_text().splitlines()]
    assert lines[0] == {"step": 0, "stage_starts": [0]}
    train = {e["step"]: e for e in lines if "train/loss" in e}
    assert sorted(train) == list(range(1, 151))
    assert all(round(train[s]["train/loss"], 4) == v["loss"] and f"{train[s]['lr']:.2e}" == f"{v['lr']:.2e}"
               for s, v in trained.steps.items())
    val = {e["step"]: (round(e["val/loss"], 4), round(e["val/loss_shuffled_images"], 4)) for e in lines
           if "val/loss" in e}
    assert val == trained.val
    # eval_subset=4 questions of each type at the eval intervals, all 16 of each type at the end
    accuracy = {e["step"]: e for e in lines if any(k.startswith("accuracy/") for k in e)}
    assert sorted(accuracy) == [50, 100, 150] and "step 50: accuracy color" in trained.stdout
    assert all(len(accuracy[s]) == 7 and all(v * 4 == int(v * 4) for k, v in accuracy[s].items() if k != "step")
               for s in (50, 100))
    results = json.loads((trained.out_dir / "eval.json").read_text())
    assert accuracy[150] == {"step": 150, **{f"accuracy/{t}": results[t] for t in results["n_questions"]}}
    png = (trained.out_dir / "curves.png").read_bytes()
    assert png.startswith(b"\x89PNG") and 10_000 < len(png) < 200_000
    # plot.py draws any run's log again, the same picture
    (trained.out_dir / "curves.png").unlink()
    assert run_script([sys.executable, "plot.py", str(trained.out_dir)]).stdout.strip().endswith("curves.png")
    assert (trained.out_dir / "curves.png").read_bytes() == png


def test_exact_resume(run_a, train, tmp_path):
    """Steps 4-6 of a run resumed from its step-3 checkpoint are those of the uninterrupted run: weights,
    optimizer state, data position and schedule all come back. (The step-3 checkpoint of the 6-step
    run is what a run that stopped after step 3 leaves: the lr schedule depends on max_iters, so a run
    with --max_iters=3 would be a different run.)"""
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copytree(run_a.out_dir / "ckpt-0000003", out / "ckpt-0000003")
    shutil.copy(run_a.out_dir / "log.jsonl", out)  # steps 4-6 logged by the run that stopped: done again
    resumed = train(out, max_iters=6, eval_interval=3, keep_last=2, eval_data_path="", init_from="resume")
    assert "loading" in resumed.stdout and "ckpt-0000003" in resumed.stdout
    assert sorted(resumed.steps) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed.steps[step] == run_a.steps[step], step  # loss, lr and grad norm as printed
    assert resumed.val[6] == run_a.val[6]
    # better than 4 decimals: the final weights are bit for bit the same
    assert same(tensors(out / "ckpt-0000006"), tensors(run_a.out_dir / "ckpt-0000006"))
    assert json.loads((out / "ckpt-0000006" / "state.json").read_text())["epoch_step"] == 6
    assert log_entries(out) == log_entries(run_a.out_dir)  # each step once, as the uninterrupted run logged it


def test_resume_takes_this_runs_learning_rate_and_keeps_its_trained_projector(run_a, train, tmp_path):
    """A resumed run's settings are its own (here twice the learning rate and floor: twice the lr at every
    step), while its weights and AdamW moments are the checkpoint's; pretrain_mm_mlp_adapter, which starts a
    run's projector, does not replace the projector that the run has trained since."""
    shutil.copytree(run_a.out_dir / "ckpt-0000003", tmp_path / "ckpt-0000003")
    resumed = train(tmp_path, max_iters=6, eval_interval=3, keep_last=2, eval_data_path="", init_from="resume",
                    learning_rate=4e-3, min_lr=2e-4, pretrain_mm_mlp_adapter=run_a.out_dir / "ckpt-0000006")
    assert "projector from" not in resumed.stdout
    assert resumed.steps[4]["loss"] == run_a.steps[4]["loss"]  # the step-3 weights, projector included
    for step in (4, 5, 6):
        assert resumed.steps[step]["lr"] == pytest.approx(2 * run_a.steps[step]["lr"], rel=1e-2), step


def test_resume_without_checkpoint_fails(shapes, tmp_path):
    from conftest import train_args
    proc = run_script([sys.executable, "train.py"] + train_args(shapes, tmp_path / "empty", init_from="resume"),
                      check=False)
    assert proc.returncode != 0 and "holds no checkpoint" in proc.stderr


def test_projector_only_stage_trains_only_the_projector(run_a, train, shapes, tmp_path):
    """LLaVA stage 1 (tune_mm_mlp_adapter=True, plain template, captions) from the step-3 checkpoint."""
    start = run_a.out_dir / "ckpt-0000003"
    run = train(tmp_path / "stage1", init_from=str(start), tune_mm_mlp_adapter=True, version="plain",
                data_path=shapes / "captions.json", val_data_path="", eval_data_path="", max_iters=3)
    assert sorted(run.steps) == [1, 2, 3]
    before, after = tensors(start), tensors(tmp_path / "stage1" / "ckpt-0000003")
    assert before.keys() == after.keys()
    assert same(part(before, "llm."), part(after, "llm.")) and part(before, "llm.")
    assert same(part(before, "vision_tower."), part(after, "vision_tower.")) and part(before, "vision_tower.")
    proj_before, proj_after = part(before, "mm_projector."), part(after, "mm_projector.")
    assert proj_before and all(not proj_before[k].equal(proj_after[k]) for k in proj_before)
    # the control: the default stage does train the LLM and the tower
    final = tensors(run_a.out_dir / "ckpt-0000006")
    assert not same(part(before, "llm."), part(final, "llm."))
    assert not same(part(before, "vision_tower."), part(final, "vision_tower."))
    # what trained, alone (LLaVA's mm_projector.bin): the projector artefact that stage 2 starts from
    assert same(load_file(str(tmp_path / "stage1" / "ckpt-0000003" / "trainable.safetensors")), proj_after)
    stage2 = train(tmp_path / "stage2", pretrain_mm_mlp_adapter=tmp_path / "stage1" / "ckpt-0000003", max_iters=1,
                   learning_rate=1e-9, min_lr=1e-9, val_data_path="", eval_data_path="")
    assert "projector from" in stage2.stdout
    after_one_step = part(tensors(tmp_path / "stage2" / "ckpt-0000001"), "mm_projector.")
    assert all((after_one_step[k] - proj_after[k]).abs().max() < 1e-6 for k in proj_after)  # a random init is far


def test_no_weight_decay_on_biases_norms_and_embeddings(train, tmp_path):
    """One step with and without weight decay from the same start and data: AdamW's decay moves every
    matrix but no bias, norm weight or embedding (tied to the head here)."""
    runs = [train(tmp_path / str(wd), weight_decay=wd, max_iters=1, val_data_path="", eval_data_path="")
            for wd in (0.0, 0.5)]
    a, b = (tensors(r.out_dir / "ckpt-0000001") for r in runs)
    for k in a:
        exempt = a[k].dim() < 2 or k.endswith(("embed_tokens.weight", "lm_head.weight", "position_embedding.weight"))
        assert a[k].equal(b[k]) == exempt, k  # (CLIP's patch_embedding is a convolution: it decays)
    assert "vision_tower.encoder.embeddings.position_embedding.weight" in a


def test_logs_throughput_flops_memory_and_wandb_offline(shapes, tmp_path):
    import os

    from conftest import train_args
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    proc = subprocess.run([sys.executable, "train.py"] + train_args(shapes, tmp_path, max_iters=2, wandb_log=True,
                                                                    eval_data_path="", val_data_path="",
                                                                    wandb_run_name="t"),
                          cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("step 2/2")][0]
    assert re.search(r"\| \d+ tok/s \(\d+ trained, padding \d+%\) \| [\d.e+-]+ TFLOP/s per process "
                     r"\| peak mem [\d.]+ GiB \|", line), line
    # the run's full config and its logged values, in wandb's offline run file (protobuf records, whose
    # keys are stored as plain strings), to be synced later with `wandb sync`
    (record,) = (tmp_path / "wandb").glob("offline-run-*/*.wandb")
    data = record.read_bytes()
    for key in ("learning_rate", "lora_r", "fsdp_reshard_after_forward", "train/loss", "grad_norm", "tokens_per_s",
                "tflops_per_process", "peak_memory_gib", "padding"):
        assert key.encode() in data, key


def test_sample_answers(trained, shapes):
    proc = run_script([sys.executable, "sample.py", f"--out_dir={trained.out_dir}",
                       f"--image={shapes / 'images' / 'val_000000.png'}", "--prompt=What color is the circle?",
                       "--max_new_tokens=16"])
    lines = proc.stdout.strip().splitlines()
    assert lines and lines[-1].strip(), proc.stdout


def test_wrong_config_key_fails_with_a_suggestion(shapes, tmp_path):
    from conftest import train_args
    proc = run_script([sys.executable, "train.py"] + train_args(shapes, tmp_path / "x") + ["--learning_rat=0.1"],
                      check=False)
    assert proc.returncode != 0
    assert "learning_rat" in proc.stderr and "did you mean 'learning_rate'" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_default_recipe_captions_then_chat(train, shapes, tmp_path):
    """The default's shape: plain captions, then vicuna_v1 conversations (curriculum), on the conv tower."""
    run = train(tmp_path, data_path=f"{shapes / 'captions.json'},{shapes / 'train.json'}", version="plain,vicuna_v1",
                curriculum=True, vision_tower=dict(model_type="convnext", image_size=32, patch_size=2, num_stages=2,
                                                   hidden_sizes=[8, 16], depths=[1, 1]), max_iters=4, eval_data_path="")
    assert "train: 288 records" in run.stdout and "64 tokens per image" in run.stdout
    assert sorted(run.steps) == [1, 2, 3, 4] and all(math.isfinite(v) for v in run.losses().values())


# what clusters do to a run: preemption, a second run on one out_dir, bad settings -----------------------

def test_sigterm_checkpoints_the_last_step_and_the_resumed_run_goes_on_exactly(shapes, train, tmp_path):
    """SLURM's preemption: SIGTERM mid-run (no checkpoint due before the end) saves the step it is in and
    exits saying how to resume; the resumed run's losses are those of a run never stopped."""
    from conftest import output, start_script, train_args, wait_for
    args = dict(max_iters=12, eval_interval=1000, eval_data_path="")
    proc = start_script([sys.executable, "train.py"] + train_args(shapes, tmp_path / "run", **args))
    wait_for(proc, r"^step 3/12 ")
    proc.send_signal(signal.SIGTERM)
    text = output(proc)
    assert proc.returncode == 75, text
    stop = re.search(r"stopped by a signal at step (\d+): (\S+) holds the run; the same command with "
                     r"--init_from=resume goes on", text)
    step = int(stop[1])
    assert 3 <= step < 12 and stop[2].endswith(f"ckpt-{step:07d}")
    assert not (tmp_path / "run" / "lock").exists()
    resumed = train(tmp_path / "run", init_from="resume", **args)
    full = train(tmp_path / "full", **args)
    assert sorted(resumed.steps) == list(range(step + 1, 13))
    assert all(resumed.steps[s]["loss"] == full.steps[s]["loss"] for s in resumed.steps)


def test_a_second_signal_stops_at_once():
    # the handler train.py installs, with real signals: Ctrl-C asks (no KeyboardInterrupt), and so does a second
    # signal at once (as SLURM and torchrun both send one); one a second later ends the process
    code = ("import os, signal, time\nfrom train_utils import STOP, stop_on_signals\nstop_on_signals()\n"
            "os.kill(os.getpid(), signal.SIGINT)\nos.kill(os.getpid(), signal.SIGUSR1)\ntime.sleep(1.5)\n"
            "assert [s for s, _ in STOP] == [signal.SIGINT, signal.SIGUSR1], STOP\n"
            "print('asked', flush=True)\nos.kill(os.getpid(), signal.SIGTERM)\ntime.sleep(5)\nprint('still here')")
    proc = run_script([sys.executable, "-c", code], check=False)
    assert proc.stdout.strip() == "asked" and proc.returncode == -signal.SIGTERM, proc.stderr


def test_a_second_run_on_the_same_out_dir_refuses_and_a_dead_runs_lock_is_taken_over(shapes, tmp_path):
    from conftest import output, start_script, train_args, wait_for
    first = start_script([sys.executable, "train.py"] + train_args(shapes, tmp_path / "run", max_iters=10_000))
    wait_for(first, r"^step 2/")
    second = run_script([sys.executable, "train.py"] + train_args(shapes, tmp_path / "run"), check=False)
    assert second.returncode != 0 and f"in use by another run: process {first.pid} on " in second.stderr
    first.kill()  # SIGKILL: no chance to unlock
    output(first)
    assert (tmp_path / "run" / "lock").exists()
    third = run_script([sys.executable, "train.py"] + train_args(shapes, tmp_path / "run", max_iters=2,
                                                                 eval_data_path=""))
    assert "step 2/2" in third.stdout and not (tmp_path / "run" / "lock").exists()


def test_a_cut_short_save_is_removed_at_the_start(shapes, tmp_path):
    from conftest import train_args
    (tmp_path / "run" / "ckpt-0000009.tmp" / "optimizer").mkdir(parents=True)
    (tmp_path / "run" / "ckpt-best").mkdir()  # not the run's: left alone
    run_script([sys.executable, "train.py"] + train_args(shapes, tmp_path / "run", max_iters=2, eval_data_path=""))
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["ckpt-0000002", "ckpt-best", "curves.png", "data",
                                                                    "log.jsonl"]


BAD_SETTINGS = [("max_iters", -5, "at least 0"), ("min_lr", 1.0, "above learning_rate"),
                ("attn_implementation", "flash_attention_3", "use one of None, 'sdpa'"),
                ("warmup_ratio", 5, "between 0 and 1"), ("batch_size", 0, "at least 1"),
                ("dtype", "float64", "use one of 'float32'"), ("eval_interval", 0, "at least 1"),
                ("parallel", "zero3", "use one of 'ddp'"), ("learning_rate", 0.0, "positive"),
                ("image_aspect_ratio", "stretch", "use one of"), ("mm_projector_lr", -1.0, "positive"),
                ("lora_enable", True, "cannot also be frozen"), ("beta2", 1.0, "less than 1"),
                ("llm_from_stage", -1, "at least 0"), ("eval_final", -1, "at least 0"),
                ("llm_from_stage", 1, "needs curriculum=True"), ("tower_iters", -1, "at least 0")]


@pytest.mark.parametrize("key, value, says", BAD_SETTINGS)
def test_each_bad_setting_is_named_before_anything_is_built(key, value, says):
    from test_configurator import train_defaults

    from train_utils import check_settings
    config = {**train_defaults(), key: value, **({"tune_mm_mlp_adapter": True} if key == "lora_enable" else {}),
              **({"curriculum": False} if (key, value) == ("llm_from_stage", 1) else {})}
    with pytest.raises(ValueError, match=re.escape(f"{key}=") + ".*" + re.escape(says)):
        check_settings(config)
    check_settings(train_defaults())


def test_a_tower_taught_first_is_refused_under_lora():
    """The LoRA base is written before the tower would be taught: its adapters would load onto the untaught one."""
    from test_configurator import train_defaults

    from train_utils import check_settings
    with pytest.raises(ValueError, match="tower_data_path with lora_enable=True"):
        check_settings({**train_defaults(), "tower_data_path": "captions.json", "lora_enable": True})


def test_train_py_checks_its_settings_first(shapes, tmp_path):
    from conftest import train_args
    proc = run_script([sys.executable, "train.py"] + train_args(shapes, tmp_path / "run", max_iters=-5), check=False)
    assert proc.returncode != 0 and "max_iters=-5: must be a number of at least 0" in proc.stderr
    assert not (tmp_path / "run").exists()  # nothing was made


def test_non_finite_steps_are_skipped_up_to_max_bad_steps_then_the_run_stops_with_a_checkpoint(train, shapes, tmp_path):
    # a learning rate that makes the weights overflow after the first step: every later step is non-finite
    from conftest import train_args
    proc = run_script([sys.executable, "train.py"] + train_args(shapes, tmp_path / "run", max_iters=20,
                                                                learning_rate=1e30, warmup_iters=0, grad_clip=0.0,
                                                                eval_data_path="", max_bad_steps=2), check=False)
    assert proc.returncode != 0, proc.stdout
    assert "step 2: a non-finite loss or gradient, not applied (1 of max_bad_steps=2)" in proc.stdout
    assert "step 3: a non-finite loss or gradient, not applied (2 of max_bad_steps=2)" in proc.stdout
    stop = re.search(r"FloatingPointError: step 4: .*stopped before the weights are damaged, which (\S+) holds",
                     proc.stderr)
    assert stop and stop[1].endswith("ckpt-0000004"), proc.stderr[-2000:]
    after_step_1 = load_file(f"{stop[1]}/model.safetensors")  # the weights of step 1, never updated since
    assert all(v.isfinite().all() for v in after_step_1.values())


def test_a_non_finite_val_loss_is_never_saved(shapes, tmp_path):
    from conftest import train_args
    proc = run_script([sys.executable, "train.py"] + train_args(shapes, tmp_path / "run", max_iters=3, eval_interval=1,
                                                                learning_rate=1e30, warmup_iters=0, grad_clip=0.0,
                                                                eval_data_path=""), check=False)
    assert proc.returncode != 0 and re.search(r"step 1: val loss (nan|inf), not saved; last: None", proc.stderr)
    assert not list((tmp_path / "run").glob("ckpt-*"))
