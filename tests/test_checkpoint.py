"""checkpoint.py: save/load round trips with safetensors alone, clear errors for damaged checkpoints, a stage-1
projector from a checkpoint or LLaVA's mm_projector.bin, and a checkpoint written before VLMConfig still loading."""
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_LLM, run_script
from test_model import get_batch, make_model

from checkpoint import load, load_projector, save


def test_save_load_round_trip(shapes, tokenizer, tmp_path):
    model = make_model(tokenizer, seed=4, mm_projector_type="linear", mm_vision_select_feature="cls_patch")
    batch = get_batch(shapes, tokenizer, model, n=3)
    save(model, tmp_path / "ckpt", {"train": {"version": "vicuna_v1"}})
    torch.manual_seed(123)  # a different random init before the weights are loaded
    loaded, config = load(tmp_path / "ckpt")
    assert config["train"] == {"version": "vicuna_v1"}
    assert loaded.num_image_tokens == 17 and loaded.config.mm_projector_type == "linear"
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        assert torch.equal(model(batch), loaded.eval()(batch))
    assert loaded.llm.get_input_embeddings().weight.data_ptr() == loaded.llm.get_output_embeddings().weight.data_ptr()


def test_checkpoint_loads_with_safetensors_alone(tokenizer, tmp_path):
    """No pickle: model.safetensors holds every tensor of the model (a tied one once)."""
    from safetensors.torch import load_file
    model = make_model(tokenizer, seed=7)
    save(model, tmp_path / "ckpt")
    tensors = load_file(tmp_path / "ckpt" / "model.safetensors")
    state = model.state_dict()
    missing = set(state) - set(tensors)
    assert set(tensors) <= set(state) and len(missing) == 1 and missing < {"llm.lm_head.weight",
                                                                            "llm.model.embed_tokens.weight"}
    assert all(torch.equal(tensors[k], state[k]) for k in tensors)
    fresh = make_model(tokenizer, seed=8)
    fresh.load_state_dict(tensors, strict=False)
    assert all(torch.equal(v, state[k]) for k, v in fresh.state_dict().items())


def test_load_errors_are_clear(tokenizer, tmp_path):
    model = make_model(tokenizer)
    with pytest.raises(FileNotFoundError, match="missing config.json"):
        load(tmp_path / "nothing")
    save(model, tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # cut short
    with pytest.raises(RuntimeError) as e:
        load(tmp_path / "ckpt")
    assert str(weights) in str(e.value) and "cannot load" in str(e.value)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="missing model.safetensors"):
        load(tmp_path / "ckpt")
    other = make_model(tokenizer, model_name_or_path={**TINY_LLM, "num_hidden_layers": 1})
    save(other, tmp_path / "other")
    (tmp_path / "other" / "model.safetensors").replace(tmp_path / "ckpt" / "model.safetensors")
    with pytest.raises(RuntimeError, match="cannot load"):  # weights of another architecture
        load(tmp_path / "ckpt")


def test_load_projector_from_a_checkpoint_llava_bin_and_errors(tokenizer, tmp_path):
    trained, fresh = make_model(tokenizer, seed=1), make_model(tokenizer, seed=2)
    save(trained, tmp_path / "ckpt")
    load_projector(fresh, str(tmp_path / "ckpt"))
    assert all(torch.equal(a, b) for a, b in zip(fresh.mm_projector.state_dict().values(),
                                                 trained.mm_projector.state_dict().values()))
    # LLaVA's stage-1 artefact: a torch-saved dict under model.mm_projector.*, the same layout as ours
    llava = {f"model.mm_projector.{k}": v * 2 for k, v in trained.mm_projector.state_dict().items()}
    torch.save(llava, tmp_path / "mm_projector.bin")
    load_projector(fresh, str(tmp_path / "mm_projector.bin"))
    assert torch.equal(fresh.mm_projector[0].weight, 2 * trained.mm_projector[0].weight)
    torch.save({"model.embed_tokens.weight": torch.zeros(3)}, tmp_path / "other.bin")
    with pytest.raises(ValueError, match="holds no mm_projector weights"):
        load_projector(fresh, str(tmp_path / "other.bin"))
    linear = make_model(tokenizer, mm_projector_type="linear")
    with pytest.raises(ValueError, match="does not fit this model's projector"):
        load_projector(linear, str(tmp_path / "ckpt"))




# checkpoints written before model.VLMConfig -------------------------------------------------------------

FIXTURE = Path(__file__).parent / "fixtures" / "checkpoint_v1"


def fixture_batch():
    """The batch tests/fixtures/checkpoint_v1/expected.json was measured on (by the code that wrote it)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.cat([torch.randint(0, 63, (2, 3), generator=g), torch.full((2, 16), 63),
                     torch.randint(0, 63, (2, 6), generator=g)], 1)
    return {"input_ids": ids, "labels": torch.where(torch.arange(25) >= 19, ids, -100),
            "attention_mask": torch.ones_like(ids), "pixel_values": torch.randn(2, 3, 32, 32, generator=g)}


@pytest.mark.parametrize("older", [False, True])
def test_a_checkpoint_written_before_vlmconfig_loads_and_gives_the_same_outputs(tmp_path, older):
    """checkpoint_v1 was written by the code before VLMConfig (its settings a plain dict); older: without the
    settings added after the first checkpoints (mm_patch_merge, Ferret's), which then take their defaults."""
    path = FIXTURE
    if older:
        path = tmp_path / "ckpt"
        shutil.copytree(FIXTURE, path)
        config = json.loads((path / "config.json").read_text())
        for key in ("mm_patch_merge", "add_region_feature", "region_token_id", "region_geo_sampler",
                    "sampler_pooler_mode", "sampler_num_init_point", "sampler_num_sub_point", "sampler_num_neighbor"):
            del config["model"][key]
        (path / "config.json").write_text(json.dumps(config))
    model, config = load(path)
    expected = json.loads((FIXTURE / "expected.json").read_text())
    batch = fixture_batch()
    with torch.no_grad():
        assert abs(model.eval()(batch).item() - expected["loss"]) < 1e-5
        new = model.generate(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], max_new_tokens=5)
    assert new.tolist() == expected["generated"]
    assert model.config.mm_patch_merge == 1 and model.region_sampler is None
    assert config["train"]["version"] == "vicuna_v1"


def test_a_checkpoint_with_unknown_model_settings_is_refused_naming_it(tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(FIXTURE, path)
    config = json.loads((path / "config.json").read_text())
    config["model"]["mm_resampler"] = "perceiver"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config.json: unknown model settings \['mm_resampler'\]"):
        load(path)


# damaged checkpoints: found, named, skipped for the one before, never deleted -----------------------------

@pytest.fixture(scope="module")
def two_checkpoints(train, tmp_path_factory):
    """A run's out_dir with checkpoints at steps 2 and 4."""
    return train(tmp_path_factory.mktemp("two"), max_iters=4, eval_interval=2, keep_last=3, eval_data_path="").out_dir


def damaged(two_checkpoints, tmp_path, how):
    out = tmp_path / "out"
    shutil.copytree(two_checkpoints, out)
    how(out / "ckpt-0000004")
    return out


def cut_in_half(path):
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGES = {"weights cut short": (lambda c: cut_in_half(c / "model.safetensors"), "model.safetensors holds"),
           "state.json missing": (lambda c: (c / "state.json").unlink(), "state.json is missing"),
           "a byte of an optimizer shard": (lambda c: flip_a_byte(next((c / "optimizer").glob("*.distcp"))),
                                            "has changed since it was written"),
           "config.json broken": (lambda c: (c / "config.json").write_text("{not json"), "config.json holds"),
           "complete.json broken": (lambda c: (c / "complete.json").write_text("{"), "complete.json is unreadable")}


@pytest.mark.parametrize("kind", list(DAMAGES))
def test_a_damaged_newest_checkpoint_is_named_and_the_one_before_it_taken(two_checkpoints, tmp_path, kind):
    from checkpoint import find_checkpoint
    how, says = DAMAGES[kind]
    out = damaged(two_checkpoints, tmp_path, how)
    warnings = []
    assert find_checkpoint("resume", str(out), warnings.append) == str(out / "ckpt-0000002")
    assert len(warnings) == 1 and str(out / "ckpt-0000004") in warnings[0] and says in warnings[0], warnings
    assert (out / "ckpt-0000004").exists()  # never deleted


def test_resume_after_damage_goes_on_from_the_checkpoint_before(two_checkpoints, train, tmp_path):
    out = damaged(two_checkpoints, tmp_path, lambda c: cut_in_half(c / "model.safetensors"))
    run = train(out, init_from="resume", max_iters=4, eval_interval=2, keep_last=3, eval_data_path="")
    assert "ckpt-0000004 is damaged (model.safetensors holds" in run.stdout and sorted(run.steps) == [3, 4]


def test_checkpoints_are_the_runs_own_folders_by_step(two_checkpoints, tmp_path):
    from checkpoint import checkpoints, find_checkpoint
    out = tmp_path / "out"
    shutil.copytree(two_checkpoints, out)
    shutil.copytree(out / "ckpt-0000002", out / "ckpt-best")  # a copy kept by hand: not the run's
    shutil.copytree(out / "ckpt-0000002", out / "ckpt-10")  # ckpt-<step>, whatever its width, by step number
    (out / "ckpt-0000006.tmp").mkdir()  # a save cut short
    assert [os.path.basename(p) for p in checkpoints(str(out))] == ["ckpt-0000002", "ckpt-0000004", "ckpt-10"]
    assert find_checkpoint("resume", str(out)) == str(out / "ckpt-10")


def test_sample_and_eval_skip_a_damaged_checkpoint_and_load_names_it(two_checkpoints, shapes, tmp_path):
    # (export.py finds its checkpoint with the same newest(out_dir, names=WEIGHTS) call)
    from checkpoint import newest
    out = damaged(two_checkpoints, tmp_path, lambda c: cut_in_half(c / "model.safetensors"))
    assert newest(str(out), lambda m: None) == str(out / "ckpt-0000002")
    proc = run_script([sys.executable, "eval.py", f"--out_dir={out}", f"--eval_data_path={shapes}/val_questions.json",
                       f"--eval_image_folder={shapes}"])
    assert "ckpt-0000004 is damaged (model.safetensors holds" in proc.stderr and "wrote" in proc.stdout
    image = next((shapes / "images").glob("val_*.png"))
    proc = run_script([sys.executable, "sample.py", f"--out_dir={out}", f"--image={image}", "--max_new_tokens=4"])
    assert "ckpt-0000004 is damaged (model.safetensors holds" in proc.stderr
    with pytest.raises(ValueError, match=r"ckpt-0000004: a damaged checkpoint: model.safetensors holds"):
        load(out / "ckpt-0000004")
    (out / "ckpt-0000002" / "complete.json").unlink()  # as checkpoints from before complete.json
    (out / "ckpt-0000002" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"ckpt-0000002/config.json: not valid JSON"):
        load(out / "ckpt-0000002")


def test_a_lock_of_this_pid_is_stale_and_another_hosts_is_refused(tmp_path):
    import socket

    from checkpoint import lock, unlock
    (tmp_path / "lock").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))  # before a restart
    lock(tmp_path)
    assert json.loads((tmp_path / "lock").read_text())["pid"] == os.getpid()
    unlock(tmp_path)
    assert not (tmp_path / "lock").exists()
    (tmp_path / "lock").write_text(json.dumps({"host": "elsewhere", "pid": 1}))
    with pytest.raises(RuntimeError, match="in use by another run: process 1 on elsewhere holds"):
        lock(tmp_path)
    assert (tmp_path / "lock").exists()  # left for its owner
