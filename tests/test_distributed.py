"""train.py under torchrun: 2 real gloo processes on CPU, replicated (DDP) or sharded (FSDP2), against one
process with the same global batch; activation checkpointing under both; exact resume, and resume on
another number of processes.

Tolerance: the logged losses (printed with 4 decimals) must agree to 1e-4 relative, and the gradient
norms (2 decimals) to 0.0101 absolute. The runs are the same fp32 computation except for the order of
reductions (micro-batches padded to their own length, gradients summed by the gloo all-reduce or
reduce-scatter instead of in one backward), which moves a loss by ~1e-6 relative; 1e-4 leaves room for
that to grow over 6 Adam steps and for the 4-decimal rounding (~1e-5 relative at a loss of 6). A grad
norm printed with 2 decimals can differ by 0.01 between equal values. A wrong loss weighting or a
missing gradient sync is far outside both: weighting the ranks' means equally moves the step-1 grad norm
by 0.04 and the loss by 2e-4 relative at step 3. A resume on as many processes is exact, to the digit.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

STEPS = 6
COMMON = dict(max_iters=STEPS, batch_size=4, eval_data_path="", eval_interval=3, keep_last=2)  # val loss at 3 and 6


def compare(one, two):
    assert sorted(one.steps) == sorted(two.steps) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        a, b = one.steps[step], two.steps[step]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), (step, one.losses(), two.losses())
        assert b["grad"] == pytest.approx(a["grad"], abs=0.0101), (step, a, b)
        assert b["lr"] == a["lr"]


def weights(run, step=STEPS):
    return load_file(str(run.out_dir / f"ckpt-{step:07d}" / "model.safetensors"))


def close(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if k.endswith("k_proj.bias"):  # its true gradient is 0 (softmax ignores a shift shared by all keys): Adam
            continue  # turns the rounding noise that stands in for it into lr-sized steps, different in each run
        assert (a[k] - b[k]).abs().max() <= 1e-4 * a[k].abs().max() + 1e-6, k


@pytest.fixture(scope="module")
def one(train, tmp_path_factory):
    """The reference: one process, global batch 4, checkpoints at steps 3 and 6."""
    return train(tmp_path_factory.mktemp("one"), **COMMON)


@pytest.fixture(scope="module", params=["ddp", "fsdp"])
def two(request, train, tmp_path_factory):
    """The same on 2 processes, each with half of every batch."""
    run = train(tmp_path_factory.mktemp(f"two-{request.param}"), nproc=2, parallel=request.param, **COMMON)
    run.parallel = request.param
    return run


def test_two_processes_train_like_one(one, two):
    assert "train: 192 records, 48 steps of 4 per epoch" in two.stdout
    assert two.stdout.count(f"step {STEPS}/{STEPS}") == 1  # rank 0 logs alone
    compare(one, two)
    close(weights(one), weights(two))  # FSDP's checkpoint is gathered from the shards: the same names and shapes
    assert sorted(two.val) == [3, 6] and two.val[6][0] == pytest.approx(one.val[6][0], rel=1e-4)
    # the optimizer state as the processes held it: their shard files, and the metadata that maps them
    files = [p.name for p in (two.out_dir / f"ckpt-{STEPS:07d}" / "optimizer").iterdir()]
    assert ".metadata" in files and len([f for f in files if f.endswith(".distcp")]) == 2
    rngs = json.loads((two.out_dir / f"ckpt-{STEPS:07d}" / "state.json").read_text())["rng"]
    assert len(rngs) == 2 and all(r["cpu"] for r in rngs)


def test_two_nodes_resume_and_train_like_one_node(two, train, tmp_path):
    """Exact resume, and across nodes: two torchrun launches as two nodes of one process each (a c10d
    rendezvous on loopback, as on a cluster) resume one node's step-3 checkpoint and take the steps 4-6 of
    the uninterrupted run, to the printed digit, and end with its weights, bit for bit."""
    shutil.copytree(two.out_dir / "ckpt-0000003", tmp_path / "ckpt-0000003")
    resumed = train(tmp_path, nnodes=2, parallel=two.parallel, init_from="resume", **COMMON)
    assert sorted(resumed.steps) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed.steps[step] == two.steps[step], step
    a, b = weights(resumed), weights(two)
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_resume_on_another_number_of_processes(two, one, train, tmp_path):
    """A 2-process checkpoint resumed by one process (the optimizer state resharded from 2 shards to 1)
    continues as the 1-process run does, within the tolerance above."""
    shutil.copytree(two.out_dir / "ckpt-0000003", tmp_path / "ckpt-0000003")
    resumed = train(tmp_path, init_from="resume", **COMMON)
    assert sorted(resumed.steps) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed.steps[step]["loss"] == pytest.approx(one.steps[step]["loss"], rel=1e-4), step
        assert resumed.steps[step]["grad"] == pytest.approx(one.steps[step]["grad"], abs=0.0101), step
    close(weights(resumed), weights(one))


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_accumulation_and_activation_checkpointing_like_one_process(train, tmp_path, parallel):
    # 2 ranks x 1 micro-step vs 1 process x 2 micro-steps of 4 records; the 2 processes recompute each
    # block in backward, the one process keeps its activations: the same losses, gradients and weights
    common = dict(COMMON, eval_interval=1000, gradient_accumulation_steps=2)
    ref = train(tmp_path / "one", **common)
    two = train(tmp_path / "two", nproc=2, parallel=parallel, activation_checkpointing=True, **common)
    assert "24 steps of 8 per epoch" in ref.stdout and "24 steps of 8 per epoch" in two.stdout
    assert "activation checkpointing: 3 blocks" in two.stdout  # the LLM's 2 and the (training) tower's 1
    if parallel == "fsdp":
        assert "FSDP: 3 blocks and the root, over 2 processes" in two.stdout
    compare(ref, two)
    close(weights(ref), weights(two))


def test_activation_checkpointing_changes_nothing_under_fsdp(train, tmp_path):
    """The same 2-process FSDP run with and without recomputation, with dropout in the LLM: the recomputed
    blocks draw the same masks, so every logged number is the same, to the digit."""
    from conftest import TINY_LLM
    common = dict(COMMON, eval_interval=1000, val_data_path="", parallel="fsdp",
                  model_name_or_path={**TINY_LLM, "attention_dropout": 0.2})
    plain = train(tmp_path / "plain", nproc=2, **common)
    recomputed = train(tmp_path / "recomputed", nproc=2, activation_checkpointing=True, **common)
    assert recomputed.steps == plain.steps and len(plain.steps) == STEPS


@pytest.mark.parametrize("parallel, reshard", [("ddp", True), ("fsdp", False)])
def test_text_only_batches_and_a_short_last_batch_like_one(train, shapes, tmp_path, parallel, reshard):
    # LLaVA-style modality grouping makes whole batches without images, where the projector and tower would
    # get no gradient (DDP's unused-parameter error; FSDP's collectives out of step, in training and in the
    # val loss); 9 records in global batches of 4 leave a last batch of one record, so one rank runs a
    # stand-in with nothing trained. Both must match one process, under DDP and under FSDP as ZeRO-2
    # (reshard=False, the harder case: a val loss, with no backward, must leave its units sharded again for
    # the checkpoint).
    records = json.loads((shapes / "train.json").read_text())[:9]
    for r in records[5:]:
        r.pop("image")
        r["conversations"][0]["value"] = r["conversations"][0]["value"].replace("<image>", "").strip()
    (tmp_path / "mix.json").write_text(json.dumps(records))
    common = dict(COMMON, data_path=tmp_path / "mix.json", val_data_path=tmp_path / "mix.json",
                  group_by_modality_length=True)
    ref = train(tmp_path / "one", **common)
    two = train(tmp_path / "two", nproc=2, parallel=parallel, fsdp_reshard_after_forward=reshard, **common)
    assert "train: 9 records, 3 steps of 4 per epoch" in ref.stdout and "3 steps of 4 per epoch" in two.stdout
    compare(ref, two)
    assert sorted(two.val) == [3, 6]


# what clusters do: SIGTERM to torchrun (preemption), a rank that stops answering ------------------------

def torchrun(shapes, out_dir, *launcher, **overrides):
    from conftest import start_script, train_args
    return start_script([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                         *launcher, "train.py"] + train_args(shapes, out_dir, **overrides))


@pytest.mark.parametrize("parallel", ["fsdp"])  # FSDP: the harder case, every rank writes its own shards
def test_sigterm_to_torchrun_checkpoints_on_every_rank_and_the_run_resumes(shapes, train, tmp_path, parallel):
    """torchrun forwards SIGTERM to its workers and waits for them: they agree on the step to stop at, save it
    together (every rank its optimizer shard), and exit; the run resumes from it to the end. (That a resume
    on two processes is exact test_exact_resume_on_two_processes shows, and one from a signal's checkpoint
    the one-process test in test_train.py.)"""
    from conftest import output, wait_for
    args = dict(max_iters=12, batch_size=4, eval_interval=1000, eval_data_path="", parallel=parallel)
    proc = torchrun(shapes, tmp_path / "run", **args)
    wait_for(proc, r"^step 3/12 ")
    proc.send_signal(signal.SIGTERM)
    text = output(proc)
    stop = re.search(r"stopped by a signal at step (\d+): (\S+) holds the run", text)
    assert stop, text[-3000:]
    step = int(stop[1])
    from checkpoint import damage, find_checkpoint
    assert find_checkpoint("resume", str(tmp_path / "run")) == stop[2] and damage(stop[2]) is None
    resumed = train(tmp_path / "run", nproc=2, init_from="resume", **args)
    assert sorted(resumed.steps) == list(range(step + 1, 13))


def test_a_stopped_rank_ends_the_job_within_the_timeout(shapes, tmp_path):
    """SIGSTOP on one of two ranks: the other's next collective gives up after dist_timeout seconds, with an
    error naming the rank, and the job ends instead of hanging."""
    from conftest import output, wait_for
    proc = torchrun(shapes, tmp_path / "run", max_iters=10_000, batch_size=4, eval_interval=10_000, dist_timeout=5)
    wait_for(proc, r"^step 3/")
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, workers
    os.kill(int(workers[1]), signal.SIGSTOP)
    start = time.time()
    wait_for(proc, r"\[rank0\].*([Tt]imed out|timeout)", timeout=60)
    assert time.time() - start < 5 + 15
    # torchrun now gives the stopped rank 30 s to end after its SIGTERM: let it run, and its collective fails
    os.kill(int(workers[1]), signal.SIGCONT)
    text = output(proc, timeout=60)
    assert proc.returncode != 0 and "train.py FAILED" in text, text[-3000:]


def test_rank_0s_own_work_may_outlast_the_timeout(shapes, train, tmp_path):
    """Preprocessing and the final evaluation run on rank 0 alone, for longer than dist_timeout here (a
    first run on LLaVA's 665K mix takes far longer than NCCL's 10 minutes): the other rank waits for it
    without timing out."""
    # 1536 questions take rank 0 several seconds (the other rank waiting in the default group times out)
    questions = json.loads((shapes / "val_questions.json").read_text())
    (tmp_path / "questions.json").write_text(json.dumps(questions * 16))
    run = train(tmp_path / "run", nproc=2, max_iters=2, batch_size=4, dist_timeout=2,
                eval_data_path=tmp_path / "questions.json")
    assert sorted(run.steps) == [1, 2] and json.loads((tmp_path / "run" / "eval.json").read_text())["n_questions"]


def test_from_pretrained_folders_the_other_ranks_take_rank_0s_weights(train, tokenizer, tmp_path):
    """Ranks other than 0 build the model's shapes on the meta device, without reading the folders' weights, and
    take rank 0's by broadcast (FSDP: into their shards; the rotary and position-id buffers too): the run trains
    as one process does. A rank that kept its empty weights would give other losses, or none."""
    from conftest import TINY_LLM, TINY_TOWER
    from transformers import AutoModelForCausalLM, CLIPVisionConfig, CLIPVisionModel

    from model import hf_config
    AutoModelForCausalLM.from_config(hf_config(dict(TINY_LLM, vocab_size=len(tokenizer)))).save_pretrained(
        tmp_path / "llm")
    CLIPVisionModel(CLIPVisionConfig(**{k: v for k, v in TINY_TOWER.items() if k != "model_type"})).save_pretrained(
        tmp_path / "tower")
    folders = dict(model_name_or_path=tmp_path / "llm", vision_tower=tmp_path / "tower", **COMMON)
    one = train(tmp_path / "one", **folders)
    two = train(tmp_path / "two", nproc=2, parallel="fsdp", **folders)
    assert "ranks 1-1: the model's shapes on the meta device, then rank 0's weights by broadcast" in two.stdout
    compare(one, two)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_a_tower_taught_first_by_rank_0_reaches_every_rank_and_then_stays_frozen(shapes, train, tmp_path, parallel):
    """tower_iters: rank 0 teaches the tower alone (pretrain_tower.py) while the other ranks wait; they take its
    weights with the rest of the model, so the run trains as one process does. The tower is frozen after it."""
    taught = dict(COMMON, tower_data_path=shapes / "captions.json", tower_iters=3, unfreeze_mm_vision_tower=False)
    one = train(tmp_path / "one", **taught)
    two = train(tmp_path / "two", nproc=2, parallel=parallel, **taught)
    assert two.stdout.count("tower step 3/3: pair loss") == 1 and "tower taught on" in two.stdout
    compare(one, two)
    close(weights(one), weights(two))
    tower = [k for k in weights(one) if k.startswith("vision_tower.")]
    assert tower and all(weights(one, 3)[k].equal(weights(one)[k]) for k in tower)
