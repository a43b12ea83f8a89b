"""
Benchmarks: speed and memory of the parts of the trainer, measured and printed; BENCHMARKS.md records
the figures with the command, machine and date. Nothing here is asserted by a test.

    python bench.py                      # every benchmark
    python bench.py --what=preprocess    # one of them (names: the functions below, without bench_)
"""
import os
import sys
import time

import configurator

what = "all"  # which benchmark to run: 'all' or a name below
seed = 1337


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
    spec = importlib.util.spec_from_file_location("prep", os.path.join(os.path.dirname(__file__), "data/tokenizers/prepare.py"))
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
                      {"from": "gpt", "value": " ".join(sentence(rng.randint(5, 25)) for _ in range(rng.randint(1, 3)))}]
        records.append(turns)
    texts = [render("vicuna_v1", r) for r in records]
    print(f"{n} records, vicuna_v1, 576 tokens per image; records/s on one core (rendering the text not counted)")
    print("| tokenizer | tokens/record | conversation.tokenize | LLaVA's method | LLaVA: masked out as mismatch | same ids and labels |")
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


if __name__ == "__main__":
    globals().update(configurator.configure(dict(what=what, seed=seed), sys.argv[1:]))
    names = [n[len("bench_"):] for n in list(globals()) if n.startswith("bench_")]
    for name in names if what == "all" else [what]:
        if name not in names:
            sys.exit(f"unknown benchmark {name!r}; known: {', '.join(names)}")
        print(f"== {name}")
        t0 = time.time()
        globals()["bench_" + name]()
        print(f"({time.time() - t0:.1f}s)\n")
