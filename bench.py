"""
Benchmarks: speed and memory of the parts of the trainer, measured and printed; BENCHMARKS.md records
the figures with the command, machine and date. Nothing here is asserted by a test.

    python bench.py                      # every benchmark
    python bench.py --what=preprocess    # one of them (names: the functions below, without bench_)
    python bench.py --what=binding       # bench_shapes.py's shapes measurements: probe, readout, binding, oracle
"""
import inspect
import os
import re
import sys
import time

import numpy as np
import torch

import configurator
from bench_shapes import bench_binding, bench_oracle, bench_probe, bench_readout  # noqa: F401 (run by name below)

what = "all"  # which benchmark to run: 'all' or a name below
seed = 1337
out_dir = "out-shapes"  # the trained run that bench_probe reads (bench_shapes.py)
save_tower = ""  # a folder where bench_binding saves its trained tower ('': not saved)


# ---------------------------------------------------------------------------------------------------------
# (benchmarks: one function each, bench_<name>(), printing its figures)


def llava_v1_masks(text, tokenizer):
    """LLaVA's way (preprocess_v1 in its train.py), rewritten for comparison: tokenize the whole text, then
    walk the rounds (split at "</s>"), count the tokens of each round and of its instruction part apart,
    and mask that many; if the counts do not add up to the length, the whole sample is masked out
    ("tokenization mismatch"). <image> is one added token here, as LLaVA's tokenizer_image_token counts it.
    Returns (ids, labels, mismatch)."""
    ids = tokenizer(text)["input_ids"]
    labels, cur = list(ids), 1
    labels[:1] = [-100]
    for i, rou in enumerate(text.split("</s>")):
        if not rou:
            break
        parts = rou.split(" ASSISTANT: ")
        if len(parts) != 2:
            break
        round_len = len(tokenizer(rou)["input_ids"])  # its BOS stands in for the "</s>" the split removed
        instruction_len = len(tokenizer(parts[0] + " ASSISTANT: ")["input_ids"]) - 2
        if i > 0 and not getattr(tokenizer, "legacy", True):  # LLaVA's correction for non-legacy Llama tokenizers
            round_len, instruction_len = round_len - 1, instruction_len - 1
        labels[cur:cur + instruction_len] = [-100] * instruction_len
        cur += round_len
    labels[cur:] = [-100] * (len(labels) - cur)
    mismatch = cur != len(ids)
    return ids, ([-100] * len(ids) if mismatch else labels), mismatch


def bench_preprocess(n=2000):
    """Records/s of conversation.tokenize on one core with real tokenizers, beside LLaVA's method on the same
    records (vicuna_v1, LLaVA-1.5-like lengths: 1-5 rounds of a sentence or two each)."""
    import importlib.util
    import random
    os.environ["RAYON_NUM_THREADS"] = "1"  # one core: the tokenizers library would use them all
    from transformers import AutoTokenizer

    from conversation import render, tokenize
    spec = importlib.util.spec_from_file_location("prep", os.path.join(os.path.dirname(__file__),
                                                                       "data/tokenizers/prepare.py"))
    prep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prep)
    rng = random.Random(seed)
    words = ("the a image shows red blue large small cat dog man woman table left right of on in with is are "
             "what where how many color there picture background person holding wearing sitting next to").split()
    sentence = lambda k: " ".join(rng.choice(words) for _ in range(k)).capitalize() + rng.choice(".?")  # noqa: E731
    records = []
    for _ in range(n):
        turns = []
        for r in range(rng.randint(1, 5)):
            turns += [{"from": "human", "value": ("<image>\n" if r == 0 else "") + sentence(rng.randint(5, 15))},
                      {"from": "gpt",
                       "value": " ".join(sentence(rng.randint(5, 25)) for _ in range(rng.randint(1, 3)))}]
        records.append(turns)
    texts = [render("vicuna_v1", r) for r in records]
    print(f"{n} records, vicuna_v1, 576 tokens per image; records/s on one core (rendering the text not counted)")
    print("| tokenizer | tokens/record | conversation.tokenize | LLaVA's method | LLaVA: masked out as mismatch "
          "| same ids and labels |")
    print("|---|---|---|---|---|---|")
    for name in prep.SOURCES:
        tok = AutoTokenizer.from_pretrained(prep.fetch(name))
        tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
        t0 = time.perf_counter()
        ours = [tokenize("vicuna_v1", r, tok, 576) for r in records]
        t_ours = time.perf_counter() - t0
        t0 = time.perf_counter()
        theirs = [llava_v1_masks(t, tok) for t in texts]
        t_theirs = time.perf_counter() - t0
        image_id = tok.convert_tokens_to_ids("<image>")

        def one_image(ids, labels):  # our ids hold 576 image tokens per image, LLaVA's one
            keep = [k for k, i in enumerate(ids) if i != image_id or k == 0 or ids[k - 1] != image_id]
            return [ids[k] for k in keep], [labels[k] for k in keep]
        agree = sum(one_image(*o) == (ids, labels) for o, (ids, labels, _) in zip(ours, theirs))
        print(f"| {name} | {sum(len(ids) for ids, _ in ours) / n:.0f} | {n / t_ours:.0f} | {n / t_theirs:.0f} | "
              f"{sum(m for _, _, m in theirs)} | {agree} |")


def _loss_memory_run(full, T, d, V, labelled, seed, queue):
    """One loss, forward and backward, in a fresh process, so that the process's peak memory is this
    loss's: the LM head on the labelled positions only (VLM.forward), or on all of them (the usual way)."""
    import resource

    import torch
    import torch.nn.functional as F
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)  # bf16 matmuls are slow on CPUs
    torch.manual_seed(seed)
    head = torch.nn.Linear(d, V, bias=False, device=device, dtype=dtype)

    def loss_of(T):
        hidden = torch.randn(1, T, d, device=device, dtype=dtype, requires_grad=True)
        labels = torch.randint(V, (1, T), device=device)
        labels[torch.rand(1, T, device=device) >= labelled] = -100
        return hidden, labels[:, 1:]

    def run(hidden, labels):
        if full:
            logits = head(hidden[:, :-1])
            loss = F.cross_entropy(logits.float().reshape(-1, V), labels.reshape(-1), ignore_index=-100)
        else:
            keep = labels != -100
            loss = F.cross_entropy(head(hidden[:, :-1][keep]).float(), labels[keep])
        loss.backward()

    run(*loss_of(16))  # warm-up: kernels and thread pools, a few MiB
    inputs = loss_of(T)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")  # resident now
    t0 = time.time()
    run(*inputs)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.time() - t0
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    queue.put((peak - base, seconds, int((inputs[1] != -100).sum()), device))


def write_synthetic_shards(path, n, image, seed=0, tokens=(100, 800), vocab=32000):
    """Shards as data.preprocess writes them, for n records of random ids (an image each, all the same
    file): preprocessing a million records would take the benchmark's whole time."""
    import json

    import numpy as np
    rng = np.random.default_rng(seed)
    lengths = rng.integers(*tokens, n)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    os.makedirs(path, exist_ok=True)
    rng.integers(10, vocab, offsets[-1], dtype=np.int32).tofile(os.path.join(path, "ids.bin"))
    (rng.random(offsets[-1]) < 0.3).astype(np.uint8).tofile(os.path.join(path, "trained.bin"))
    np.save(os.path.join(path, "offsets.npy"), offsets.astype(np.int64))
    np.save(os.path.join(path, "lengths.npy"), lengths.astype(np.int32))
    np.save(os.path.join(path, "sources.npy"), np.zeros(n, np.int16))
    np.save(os.path.join(path, "image_index.npy"), np.arange(n + 1, dtype=np.int64))
    np.save(os.path.join(path, "images.npy"), np.full(n, image.encode()))
    open(os.path.join(path, "regions.bin"), "wb").close()  # no record has regions
    np.save(os.path.join(path, "region_offsets.npy"), np.zeros(n + 1, np.int64))
    with open(os.path.join(path, "manifest.json"), "w") as f:
        json.dump({"format": 2, "num_image_tokens": 1, "image_token_id": 5, "skipped": 0, "sources": [{}],
                   "records": n}, f)


def worker_memory():
    """This process's memory now, in MiB: resident; anonymous (its heap: Python objects, and the pages it
    copied from its parent on write); resident file pages (mapped shards and libraries: page cache, shared
    and reclaimable, which the kernel may map in large folios, so it grows with the pages touched)."""
    fields = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                fields[parts[0].rstrip(":")] = int(parts[1]) / 1024
    return fields.get("Rss", 0), fields.get("Anonymous", 0), fields.get("Rss", 0) - fields.get("Anonymous", 0)


def bench_data_memory(sizes=(10_000, 1_000_000), batches=300, batch=8, workers=2):
    """Memory of a DataLoader worker over `batches` random batches (images decoded in the workers), for
    10K and 1M records: from glimpse's memory-mapped shards, and from a list of LLaVA record dicts (the
    JSON held in memory, as LLaVA's LazySupervisedDataset holds it in every worker)."""
    import gc
    import tempfile

    import numpy as np
    import torch
    from PIL import Image

    from data import ShardDataset, load_image

    class Measured(torch.utils.data.Dataset):  # a sample carries its worker's memory figures
        def __init__(self, inner):
            self.inner = inner

        def __len__(self):
            return len(self.inner)

        def __getitem__(self, i):
            # a full garbage collection, as a long run has now and then: it writes to every Python object, so the
            # worker's copy-on-write pages become its own
            if not hasattr(self, "collected"):
                gc.collect()
                self.collected = True
            self.inner[i]
            return worker_memory()

    class LLaVAStyle(torch.utils.data.Dataset):  # records as Python dicts, conversations read per sample
        def __init__(self, records, image):
            self.records, self.image = records, image

        def __len__(self):
            return len(self.records)

        def __getitem__(self, i):
            r = self.records[i]
            text = "".join(m["value"] for m in r["conversations"])
            return len(text), load_image(self.image, "pad", 336, [0.5] * 3, [0.5] * 3)

    with tempfile.TemporaryDirectory() as tmp:
        image = os.path.join(tmp, "img.jpg")
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(image)
        print(f"{workers} workers, {batches} random batches of {batch}; MiB per worker at the end "
              "(resident = anonymous + file pages; anonymous is what the worker cannot give back)")
        print("| records | dataset | worker resident | worker anonymous | worker file pages | parent resident |")
        print("|---|---|---|---|---|---|")
        for n in sizes:
            path = os.path.join(tmp, f"shards{n}")
            write_synthetic_shards(path, n, image)

            def llava_style():  # built only when measured: the workers fork from a parent that holds it
                words = "the a red blue cat dog on table is what where".split()
                rng = np.random.default_rng(1)
                return LLaVAStyle([{"id": str(i), "image": "img.jpg", "conversations": [
                    {"from": "human", "value": "<image>\n" + " ".join(rng.choice(words, 12))},
                    {"from": "gpt", "value": " ".join(rng.choice(words, 60))}]} for i in range(n)], image)
            for name, make in (("shards", lambda: ShardDataset(path, 336, [0.5] * 3, [0.5] * 3)),
                               ("LLaVA-style dicts", llava_style)):
                ds = make()
                sampler = torch.utils.data.RandomSampler(range(n), num_samples=batches * batch,
                                                         generator=torch.Generator().manual_seed(seed))
                loader = torch.utils.data.DataLoader(Measured(ds), batch_size=batch, sampler=sampler,
                                                     num_workers=workers, collate_fn=lambda s: s[-1])
                last = [m for m in loader][-workers:]
                rss, anon, files = (max(m[k] for m in last) for k in range(3))
                print(f"| {n:,} | {name} | {rss:.0f} | {anon:.0f} | {files:.0f} | {worker_memory()[0]:.0f} |")
                del ds, loader


def bench_loss_memory(T=2048, labelled=0.25, shapes=((4096, 32000), (896, 151936))):
    """Peak memory and time of the loss (forward + backward through the LM head) for one sequence of T
    tokens of which a fraction `labelled` is trained, at the LM widths and vocabularies of `shapes`
    (Vicuna-7B: 4096 x 32000; Qwen2-0.5B: 896 x 151936): the head on labelled positions only vs on all."""
    import multiprocessing
    ctx = multiprocessing.get_context("spawn")
    for d, V in shapes:
        results = {}
        for full in (False, True):
            queue = ctx.Queue()
            p = ctx.Process(target=_loss_memory_run, args=(full, T, d, V, labelled, seed, queue))
            p.start()
            results[full] = queue.get()
            p.join()
        (m0, s0, n, device), (m1, s1, _, _) = results[False], results[True]
        print(f"d={d} V={V} T={T}, {n} labelled ({device}): labelled only {m0 / 2**20:,.0f} MiB {s0:.2f}s | "
              f"all positions {m1 / 2**20:,.0f} MiB {s1:.2f}s | memory / {m1 / m0:.1f}, time / {s1 / s0:.1f} "
              f"(both include the head's weight gradient, {d * V * 4 / 2**20:,.0f} MiB in fp32; "
              f"the full logits alone are {(T - 1) * V * 4 / 2**20:,.0f} MiB)")


def _lora_memory_run(mode, llm, r, T, seed, queue):
    """One train step (forward, backward, AdamW step) in a fresh process: the LLM trained fully ('full'), or
    frozen under LoRA adapters on all its Linears ('lora'), its base kept in bf16 ('lora_bf16'); the
    projector trains in all three. Sends (bytes of weights, of trainable weights, of gradients, of AdamW
    state, peak over the process before the model, seconds, device)."""
    import resource

    import torch

    from lora import apply_lora, find_targets
    from model import VLM, VLMConfig
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    rss = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")  # noqa: E731
    base = torch.cuda.memory_allocated() if cuda else rss()
    torch.manual_seed(seed)
    tower = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                 num_attention_heads=2, image_size=32, patch_size=8)  # tiny: the LLM is what is measured
    model = VLM(VLMConfig(vision_tower=tower, model_name_or_path=llm, image_token_id=0, vocab_size=llm["vocab_size"]))
    model.requires_grad_(False)
    model.mm_projector.requires_grad_(True)
    if mode == "full":
        model.llm.requires_grad_(True)
    else:  # new adapters are trainable, their bases frozen
        apply_lora(model, find_targets(model), r, 2 * r, 0.05,
                   base_dtype=torch.bfloat16 if mode == "lora_bf16" else None)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step(T):
        ids = torch.randint(1, llm["vocab_size"], (1, T), device=device)
        model(dict(input_ids=ids, labels=ids, attention_mask=torch.ones_like(ids))).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # gradients stay allocated, as between a run's steps
        if cuda:
            torch.cuda.synchronize()

    step(16)  # warm-up: kernels, and the gradients and AdamW state come to exist
    t0 = time.time()
    step(T)
    seconds = time.time() - t0
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    state = [t for s in optimizer.state.values() for t in s.values() if t.dim()]
    queue.put((nbytes(model.parameters()), nbytes(params), nbytes(p.grad for p in params), nbytes(state), peak - base,
               seconds, device))


def bench_lora_memory(r=32, T=256):
    """Memory of one train step of a 0.22B Llama (1024 wide, 12 layers, vocab 32000, untied) with a tiny tower:
    full finetune of the LLM vs LoRA r on all its Linears (r / width = 1/32, as LLaVA's r=128 on a 4096-wide
    7B) vs the same with the frozen base in bf16. Each in a fresh process; on a GPU, max_memory_allocated."""
    import multiprocessing
    llm = dict(model_type="llama", hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
               num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048, vocab_size=32000,
               tie_word_embeddings=False)
    ctx = multiprocessing.get_context("spawn")
    print(f"one sequence of {T} tokens; MiB")
    print("| mode | weights | trainable | gradients | AdamW state | peak of the step (process) | step time |")
    print("|---|---|---|---|---|---|---|")
    for mode in ("full", "lora", "lora_bf16"):
        queue = ctx.Queue()
        p = ctx.Process(target=_lora_memory_run, args=(mode, llm, r, T, seed, queue))
        p.start()
        weights, trainable, grads, state, peak, seconds, device = queue.get()
        p.join()
        mib = lambda b: f"{b / 2**20:,.0f}"  # noqa: E731
        print(f"| {mode if mode == 'full' else f'{mode} r={r}'} | {mib(weights)} | {mib(trainable)} | {mib(grads)} | "
              f"{mib(state)} | {mib(peak)} | {seconds:.1f} s ({device}) |")


def bench_parallel(steps=3, width=512, layers=8, batch_size=48, nproc=2):
    """train.py itself under torchrun on `nproc` processes (gloo on a CPU, nccl on GPUs), for an LLM of
    `layers` x `width` (about 12 width^2 layers parameters) on the shapes data, the tower training too:
    DDP and FSDP (ZeRO-3 and ZeRO-2), each without and with activation checkpointing. Its own log line
    gives the figures of the last step: peak memory (the largest process's), tokens/s, FLOP/s (and MFU)."""
    import re
    import subprocess
    llm = dict(model_type="llama", hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
               num_attention_heads=width // 64, num_key_value_heads=width // 64, max_position_embeddings=512)
    print(f"{nproc} processes, LLM {layers} x {width}, global batch {batch_size}, {steps} steps; "
          "the last step's log line")
    print("| parallel | activation checkpointing | peak memory per process | tokens/s | TFLOP/s per process |")
    print("|---|---|---|---|---|")
    for parallel, reshard in (("ddp", True), ("fsdp", True), ("fsdp", False)):
        for ac in (False, True):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                   "train.py", f"--model_name_or_path={llm}", f"--parallel={parallel}",
                   f"--fsdp_reshard_after_forward={reshard}", f"--activation_checkpointing={ac}",
                   f"--batch_size={batch_size // nproc}", f"--max_iters={steps}", "--log_interval=1",
                   "--eval_interval=100000", "--eval_data_path=", "--val_data_path=", "--out_dir=out-bench-parallel",
                   "--tower_data_path=", "--unfreeze_mm_vision_tower=True"]  # the tower trains: what to measure
            out = subprocess.run(cmd, capture_output=True, text=True,
                                 env={**os.environ, "OMP_NUM_THREADS": str(max(1, os.cpu_count() // nproc))})
            line = [ln for ln in out.stdout.splitlines() if ln.startswith(f"step {steps}/")]
            if out.returncode or not line:
                sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
            m = re.search(r"\| (\d+) tok/s .*?\| ([\d.e+-]+) TFLOP/s per process(, MFU [\d.]+%)? "
                          r"\| peak mem ([\d.]+) GiB", line[0])
            name = parallel if parallel == "ddp" else f"fsdp, reshard_after_forward={reshard}"
            print(f"| {name} | {ac} | {float(m[4]):.2f} GiB | {m[1]} | {m[2]}{m[3] or ''} |")


# the baseline and glimpse on the same model: a Qwen2-0.5B-shaped LLM (fewer layers) under a CLIP-shaped tower
QWEN2_05B = dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, max_position_embeddings=4096, tie_word_embeddings=True)
CLIP_B = dict(model_type="clip_vision_model", hidden_size=768, intermediate_size=3072, num_attention_heads=12,
              patch_size=16)


def llava_like_lengths(n, rng, image_tokens=576, max_len=2048, text_only=0.06):
    """(text tokens, has an image) of n records in the shape of LLaVA-1.5's 665K mix: 6% text-only (its 40K
    ShareGPT conversations, long: log-normal around 700 tokens), the rest an image and a conversation about it
    (VQA and GQA's short answers to LLaVA-Instruct's long ones: log-normal around 180 tokens), all within
    max_len. A parametric stand-in from the mix's composition as LLaVA's paper gives it, not read from the file
    (which is not here); bench_throughput scales it down for a CPU."""
    has_image = rng.random(n) >= text_only
    text = np.where(has_image, rng.lognormal(np.log(180), 0.75, n), rng.lognormal(np.log(700), 0.6, n))
    text = np.clip(text * max_len / 2048, 8, max_len - 1 - has_image * image_tokens).astype(int)  # and a BOS
    return list(zip(text.tolist(), has_image.tolist()))


def synthetic_samples(records, seed, image_tokens, image_size, image_id, vocab):
    """Samples as ShardDataset gives them: [BOS, image tokens, text], half of the text trained (turns of 16)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n_text, has_image in records:
        text = torch.randint(10, image_id, (n_text,), generator=g)
        ids = torch.cat([torch.tensor([1]), torch.full((image_tokens * has_image,), image_id), text])
        trained = torch.cat([torch.zeros(1 + image_tokens * has_image, dtype=torch.bool),
                             torch.arange(n_text) // 16 % 2 == 1])
        out.append({"input_ids": ids, "labels": torch.where(trained, ids, -100),
                    "pixel_values": torch.randn(int(has_image), 3, image_size, image_size, generator=g),
                    "region_masks": torch.zeros(0, image_size, image_size, dtype=torch.bool),
                    "region_image": torch.zeros(0, dtype=torch.long)})
    return out


def padded_for_transformers(samples, pad_id):
    """What a user's collator gives LlavaForConditionalGeneration: right-padded to the longest, with the mask."""
    T = max(len(s["input_ids"]) for s in samples)
    pad = lambda key, value: torch.stack([torch.cat([s[key], torch.full((T - len(s[key]),), value)])  # noqa: E731
                                          for s in samples])
    pixels = torch.cat([s["pixel_values"] for s in samples])
    return dict(input_ids=pad("input_ids", pad_id), labels=pad("labels", -100),
                attention_mask=pad("input_ids", -1) != -1, pixel_values=pixels if len(pixels) else None)


def _throughput_run(variant, folder, records, batches, image_tokens, max_len, queue):
    """One variant's steps in a fresh process (its peak memory is its own): the first a warm-up, the others
    timed. The tower is frozen, the projector and the LLM train (LLaVA's stage 2); on a GPU in bf16 autocast."""
    import resource
    from contextlib import nullcontext

    from checkpoint import load
    from data import collate
    cuda = torch.cuda.is_available()
    device, autocast = ("cuda", torch.autocast("cuda", torch.bfloat16)) if cuda else ("cpu", nullcontext())
    if variant == "transformers":
        from transformers import LlavaForConditionalGeneration
        model = LlavaForConditionalGeneration.from_pretrained(os.path.join(folder, "hf"), dtype=torch.float32)
        model.model.vision_tower.requires_grad_(False)
        image_id, size = model.config.image_token_index, model.config.vision_config.image_size
    else:
        model = load(os.path.join(folder, "glimpse"))[0]
        model.vision_tower.requires_grad_(False)
        image_id, size = model.image_token_id, model.vision_tower.image_size
    model.to(device).train()
    # the baseline's the default form (foreach), glimpse's train.py's (fused)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5,
                                  fused=variant != "transformers")
    samples = synthetic_samples(records, 0, image_tokens, size, image_id, image_id)
    seconds = trained = tokens = positions = 0
    for step, chunk in enumerate(batches):
        part = [samples[i] for i in chunk]
        if variant == "transformers":
            batch = padded_for_transformers(part, 0)
        else:
            batch = collate(part, 0, image_id, None, max_len if variant == "glimpse packed" else 0)
        t0 = time.time()
        on_device = {k: v if v is None else v.to(device) for k, v in batch.items()}
        with autocast:
            loss = model(**on_device).loss if variant == "transformers" else model(on_device)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if step:  # the first step is the warm-up
            seconds += time.time() - t0
            trained += int((batch["labels"][:, 1:] != -100).sum())
            tokens, positions = tokens + int(batch["attention_mask"].sum()), positions + batch["input_ids"].numel()
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    queue.put(dict(trained_per_s=trained / seconds, step_s=seconds / (len(batches) - 1), padding=1 - tokens / positions,
                   peak=peak, device=device))


def bench_throughput(micro_batch=16, steps=2, llm_layers=6, tower_layers=4, scale=4, llm=QWEN2_05B, tower=CLIP_B,
                     folder="out-bench-throughput"):
    """Trained tokens/s, step time, padding and peak memory of (a) transformers' LlavaForConditionalGeneration in
    the loop a user would write (right-padded batches, its loss from logits at every position, AdamW), (b) glimpse
    padded, (c) glimpse with group_by_modality_length, (d) glimpse packed: the same weights (one model, saved
    once and loaded by each), the same records (LLaVA-665K-shaped, llava_like_lengths; scale: its lengths, the
    image's 576 tokens and model_max_length 2048, divided by that for a CPU), micro_batch records a step (one
    step's global batch), each variant in a fresh process. Also AdamW's step on the same parameters, foreach
    (torch's default on a CPU, the baseline's) against fused (train.py's)."""
    import multiprocessing

    from checkpoint import save
    from data import global_batches
    from hf_llava import save_hf_llava
    from model import VLM, VLMConfig
    patch = tower["patch_size"]
    image_size, max_len = patch * round((576 / scale) ** 0.5), 2048 // scale
    image_tokens = (image_size // patch) ** 2
    torch.manual_seed(seed)
    model = VLM(VLMConfig(model_name_or_path=dict(llm, num_hidden_layers=llm_layers),
                          vision_tower=dict(tower, num_hidden_layers=tower_layers, image_size=image_size),
                          mm_vision_select_layer=-2, vocab_size=llm["vocab_size"],
                          image_token_id=llm["vocab_size"] - 1))
    save(model, os.path.join(folder, "glimpse"))
    save_hf_llava(model, os.path.join(folder, "hf"))
    params = [p for n, p in model.named_parameters() if not n.startswith("vision_tower")]
    print(f"LLM: {llm['model_type']} {llm_layers} layers x {llm['hidden_size']}; tower: {tower['model_type']} "
          f"{tower_layers} layers x {tower['hidden_size']}, "
          f"{image_size} px, {image_tokens} tokens; {sum(p.numel() for p in params) / 1e6:.0f}M trained parameters; "
          f"model_max_length {max_len}; {micro_batch} records a step, {steps} steps timed after one")
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    for p in params:
        p.grad = torch.randn_like(p)
    for fused in (False, True):
        optimizer = torch.optim.AdamW(params, lr=1e-5, fused=fused)
        optimizer.step()  # its state comes to exist
        t0 = time.time()
        optimizer.step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        print(f"AdamW step, {'fused' if fused else 'foreach'}: {time.time() - t0:.2f} s")
    del model, params, optimizer
    rng = np.random.default_rng(seed)
    n = micro_batch * (steps + 1)
    records = llava_like_lengths(n, rng, image_tokens, max_len)
    lengths = np.array([1 + t + image_tokens * i for t, i in records])
    plain = [list(range(k, k + micro_batch)) for k in range(0, n, micro_batch)]
    grouped = global_batches(np.arange(n), micro_batch, lengths, np.array([i for _, i in records]), seed)
    variants = {"transformers": plain, "glimpse padded": plain, "glimpse grouped": grouped, "glimpse packed": plain}
    ctx, results = multiprocessing.get_context("spawn"), {}
    print("| variant | trained tokens/s | step | padding | peak memory (process) |")
    print("|---|---|---|---|---|")
    for name, batches in variants.items():
        queue = ctx.Queue()
        p = ctx.Process(target=_throughput_run, args=(name, folder, records, [[int(i) for i in b] for b in batches],
                                                      image_tokens, max_len, queue))
        p.start()
        r = results[name] = queue.get()
        p.join()
        print(f"| {name} | {r['trained_per_s']:.0f} | {r['step_s']:.2f} s | {100 * r['padding']:.1f}% | "
              f"{r['peak'] / 2**30:.2f} GiB ({r['device']}) |", flush=True)
    base = results["transformers"]
    for name, r in results.items():
        print(f"{name}: {r['trained_per_s'] / base['trained_per_s']:.2f}x the transformers baseline in trained "
              f"tokens/s, padding {100 * r['padding']:.1f}%, peak memory {r['peak'] / base['peak']:.2f}x")


SIGLIP_B = dict(model_type="siglip_vision_model", hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, image_size=224, patch_size=16)
# the CUDA paths bench_gpu checks, each a train.py run: (name, its settings)
GPU_RUNS = [("ddp, bf16 autocast, padded", dict(parallel="ddp")),
            ("ddp, bf16 autocast, packed (sdpa)", dict(parallel="ddp", packing=True)),
            ("fsdp, bf16 policy, activation checkpointing, packed (sdpa)",
             dict(parallel="fsdp", activation_checkpointing=True, packing=True)),
            ("fsdp, bf16 policy, packed (flex_attention)", dict(parallel="fsdp", packing=True,
                                                               attn_implementation="flex_attention")),
            ("fsdp, bf16 policy, packed, compile", dict(parallel="fsdp", packing=True, compile=True))]


def bench_gpu(llm=QWEN2_05B, tower=SIGLIP_B, steps=30, images=2000, batch_size=16, max_len=2048, dtype="bfloat16",
              runs=GPU_RUNS, throughput=None, folder="out-bench-gpu", timeout=240):
    """For a lent GPU, in about 8 minutes on an H200: train.py itself under torchrun --nproc_per_node=1 on a ~1B VLM
    (a Qwen2-0.5B LLM and a SigLIP-B tower, from scratch; the tower frozen, LLaVA's stage 2) at model_max_length
    2048, on shapes data made here (no network there), each run of GPU_RUNS in turn: bf16 autocast (DDP) and
    FSDP2's mixed-precision policy, activation checkpointing, fused AdamW (train.py's), packing with sdpa and
    flex_attention, compile. Each gives its last log line's tokens/s, padding, MFU (against the device's peak) and
    peak memory. Then bench_throughput at a GPU's size (throughput: its arguments; None: the full 24-layer LLM,
    576 image tokens; False: not run). A run that fails is reported with its error, and the others go on."""
    import subprocess
    shapes, shards = os.path.join(folder, "shapes"), os.path.join(folder, "shards")
    subprocess.run([sys.executable, "data/shapes/prepare.py", "--out", shapes, "--train", str(images), "--val", "20"],
                   check=True, capture_output=True)
    tokens = (tower["image_size"] // tower["patch_size"]) ** 2
    subprocess.run([sys.executable, "data.py", f"--data_path={shapes}/train.json", f"--image_folder={shapes}",
                    f"--out={shards}", f"--tokenizer={shapes}/tokenizer", "--version=vicuna_v1",
                    f"--num_image_tokens={tokens}", f"--model_max_length={max_len}"], check=True, capture_output=True)
    print(f"LLM {llm['model_type']} {llm.get('num_hidden_layers')} layers x {llm['hidden_size']}; tower "
          f"{tower['model_type']} ({tokens} tokens); {batch_size} records a step, {steps} steps; {dtype}")
    print("| run | tokens/s (trained) | padding | TFLOP/s | MFU | peak memory | note |")
    print("|---|---|---|---|---|---|---|")
    for name, settings in runs:
        args = dict(model_name_or_path=llm, vision_tower=tower, mm_vision_select_layer=-2, data_path=shards,
                    tokenizer_name_or_path=f"{shapes}/tokenizer", version="vicuna_v1", val_data_path="",
                    eval_data_path="", unfreeze_mm_vision_tower=False, tower_data_path="", data_multiple=1,
                    batch_size=batch_size, max_iters=steps,
                    log_interval=steps, eval_interval=10 * steps, model_max_length=max_len, dtype=dtype,
                    out_dir=os.path.join(folder, "run"), init_from="scratch", **settings)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "train.py"] + \
            [f"--{k}={v}" for k, v in args.items()]
        t0 = time.time()
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            line = [ln for ln in out.stdout.splitlines() if ln.startswith(f"step {steps}/")]
            error = (out.stderr.strip().splitlines() or ["no output"])[-1] if out.returncode or not line else ""
        except subprocess.TimeoutExpired:
            line, error = [], f"over {timeout} s"
        if error or not line:
            print(f"| {name} | failed: {error[:200]} | | | | | {time.time() - t0:.0f} s |", flush=True)
            continue
        m = re.search(r"\| (\d+) tok/s \((\d+) trained, padding (\d+)%\) \| ([\d.e+-]+) TFLOP/s per process"
                      r"(?:, MFU ([\d.]+)%)? \| peak mem ([\d.]+) GiB", line[0])
        print(f"| {name} | {m[1]} ({m[2]}) | {m[3]}% | {m[4]} | {m[5] or '-'}% | {m[6]} GiB | "
              f"{time.time() - t0:.0f} s in all |", flush=True)
    if throughput is not False:
        bench_throughput(**(throughput or dict(llm_layers=24, tower_layers=12, scale=1, steps=3)))


def bench_rank_memory(nproc=2, width=1536, layers=16, parallel="fsdp"):
    """The host memory of each process of a torchrun job, for a Llama of layers x width (vocab 32000) under FSDP:
    rank 0 builds the model (as every rank did before), the others its shapes on the meta device, and all take
    rank 0's weights by broadcast into their shards. Each rank's peak resident memory (VmHWM, read from /proc
    while the job runs) up to the end of that setup (the log line that says so), and over the whole run."""
    import subprocess
    import threading
    llm = dict(model_type="llama", hidden_size=width, intermediate_size=int(2.75 * width), num_hidden_layers=layers,
               num_attention_heads=width // 64, num_key_value_heads=width // 64, max_position_embeddings=512,
               vocab_size=32000)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train.py",
           f"--model_name_or_path={llm}", f"--parallel={parallel}", "--batch_size=2", "--max_iters=1",
           "--eval_interval=100000", "--eval_data_path=", "--val_data_path=", "--out_dir=out-bench-ranks",
           "--tower_data_path=", "--unfreeze_mm_vision_tower=True"]
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines, set_up = [], threading.Event()

    def read():
        for line in job.stdout:
            lines.append(line)
            if "rank 0's weights by broadcast" in line:
                set_up.set()
    threading.Thread(target=read, daemon=True).start()
    peaks, at_setup = {}, {}
    while job.poll() is None:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    rank = re.search(rb"(?:^|\0)RANK=(\d+)\0", f.read())
                with open(f"/proc/{pid}/cmdline") as f:
                    ours = "out-bench-ranks" in f.read()
                with open(f"/proc/{pid}/status") as f:
                    hwm = re.search(r"VmHWM:\s+(\d+) kB", f.read())
            except OSError:  # gone, or not ours to read
                continue
            if rank and hwm and ours:
                peaks[int(rank[1])] = max(peaks.get(int(rank[1]), 0), int(hwm[1]) * 1024)
                if not set_up.is_set():
                    at_setup[int(rank[1])] = peaks[int(rank[1])]
        time.sleep(0.1)
    output = "".join(lines)
    if job.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{output[-3000:]}")
    params = float(re.search(r"parameters: ([\d.]+)M", output)[1])
    print(f"{parallel}, {nproc} processes, {params:.0f}M parameters ({params * 4e6 / 2**30:.2f} GiB in fp32)")
    print("| rank | peak resident memory, to the end of the setup | over the run (one step) |")
    print("|---|---|---|")
    for rank in sorted(peaks):
        print(f"| {rank}{' (builds the model)' if rank == 0 else ' (meta device, then broadcast)'} | "
              f"{at_setup.get(rank, 0) / 2**30:.2f} GiB | {peaks[rank] / 2**30:.2f} GiB |")


if __name__ == "__main__":
    settings = configurator.configure(dict(what=what, seed=seed, out_dir=out_dir, save_tower=save_tower), sys.argv[1:])
    globals().update(settings)
    names = [n[len("bench_"):] for n in list(globals()) if n.startswith("bench_")]
    for name in [n for n in names if n != "gpu"] if what == "all" else [what]:  # gpu: for a lent GPU alone
        if name not in names:
            sys.exit(f"unknown benchmark {name!r}; known: {', '.join(names)}")
        print(f"== {name}")
        t0 = time.time()
        bench = globals()["bench_" + name]
        # bench_shapes.py's take the settings they use as arguments; the ones above read the globals
        bench(**{k: v for k, v in settings.items() if k in inspect.signature(bench).parameters})
        print(f"({time.time() - t0:.1f}s)\n")
