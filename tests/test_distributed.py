"""train.py under torchrun: 2 real gloo processes on CPU against one process with the same global batch.

Tolerance: the logged losses (printed with 4 decimals) must agree to 1e-4 relative, and the gradient
norms (2 decimals) to 0.0101 absolute. The runs are the same fp32 computation except for the order of
reductions (micro-batches padded to their own length, gradients summed by the gloo all-reduce instead
of in one backward), which moves a loss by ~1e-6 relative; 1e-4 leaves room for that to grow over 6
Adam steps and for the 4-decimal rounding (~1e-5 relative at a loss of 6). A grad norm printed with 2
decimals can differ by 0.01 between equal values. A wrong loss weighting or a missing gradient sync is
far outside both: weighting the ranks' means equally moves the step-1 grad norm by 0.04 and the loss
by 2e-4 relative at step 3.
"""
import pytest

STEPS = 6


def compare(one, two):
    assert sorted(one.steps) == sorted(two.steps) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        a, b = one.steps[step], two.steps[step]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), (step, one.losses(), two.losses())
        assert b["grad"] == pytest.approx(a["grad"], abs=0.0101), (step, a, b)
        assert b["lr"] == a["lr"]


def run_pair(train, tmp_path, check_records=192, **overrides):
    common = dict(max_iters=STEPS, batch_size=4, val_data_path="", eval_data_path="", eval_interval=1000, **overrides)
    one = train(tmp_path / "one", **common)
    two = train(tmp_path / "two", nproc=2, **common)
    assert f"train: {check_records} records" in two.stdout and two.stdout.count(f"step {STEPS}/{STEPS}") == 1  # rank 0 logs alone
    return one, two


def test_two_processes_split_the_batch_like_one(train, tmp_path):
    # 2 ranks x micro-batch 2 vs 1 process x micro-batch 4: the same 4 records in every step
    one, two = run_pair(train, tmp_path)
    assert "48 steps of 4 per epoch" in one.stdout and "48 steps of 4 per epoch" in two.stdout
    compare(one, two)


def test_two_processes_share_accumulation_steps_like_one(train, tmp_path):
    # 2 ranks x 1 micro-step vs 1 process x 2 micro-steps of 4 records
    one, two = run_pair(train, tmp_path, gradient_accumulation_steps=2)
    assert "24 steps of 8 per epoch" in one.stdout and "24 steps of 8 per epoch" in two.stdout
    compare(one, two)
    # and the weights after 6 steps
    from safetensors.torch import load_file
    a = load_file(str(tmp_path / "one" / f"ckpt-{STEPS:07d}" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / f"ckpt-{STEPS:07d}" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max() <= 1e-4 * a[k].abs().max() + 1e-6, k


def test_text_only_batches_and_a_short_last_batch_like_one(train, shapes, tmp_path):
    # LLaVA-style modality grouping makes whole batches without images, where the projector and tower get
    # no gradient (DDP's unused-parameter error); 9 records in global batches of 4 leave a last batch of one
    # record, so one rank runs a stand-in with nothing trained. Both must match one process.
    import json
    records = json.loads((shapes / "train.json").read_text())[:9]
    for r in records[5:]:
        r.pop("image")
        r["conversations"][0]["value"] = r["conversations"][0]["value"].replace("<image>", "").strip()
    (tmp_path / "mix.json").write_text(json.dumps(records))
    one, two = run_pair(train, tmp_path, data_path=tmp_path / "mix.json", group_by_modality_length=True, check_records=9)
    assert "3 steps of 4 per epoch" in one.stdout and "3 steps of 4 per epoch" in two.stdout
    compare(one, two)
