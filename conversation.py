"""
Chat templates: LLaVA-format messages -> prompt text -> (input_ids, labels).

A conversation is a list of LLaVA messages, {"from": "human" | "gpt" | "system", "value": str}. A template
renders it as segments (text, trained): the trained segments are exactly the assistant replies and their
end-of-turn marker. `tokenize` encodes the whole text once and labels each token by the segment its
characters come from, so the labels are exact by construction: there is no counting of tokens per
round that can drift out of step with the tokenizer (LLaVA's "WARNING: tokenization mismatch", after
which a whole sample is ignored). Where a tokenizer merges characters across a reply's edge into one
token (Qwen's BPE writes "\n\n" as one token), the text is cut there and the two sides are encoded
apart: the token can belong to the reply or to the prompt, not to both.

This file knows nothing about tensors: it returns lists of ints.
"""
import re

IMAGE_TOKEN = "<image>"
REGION_TOKEN = "<region_fea>"  # Ferret: one token per region of the image, its embedding the region's features
IGNORE_INDEX = -100
# a box as text, "[x1, y1, x2, y2]" on Ferret's 0-999 grid, as a grounding reply writes it (eval.py reads it)
BOX = re.compile(r"\[\s*(\d+),\s*(\d+),\s*(\d+),\s*(\d+)\s*\]")

VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
LLAVA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                "The assistant gives helpful, detailed, and polite answers to the human's questions.")
LLAMA_2_SYSTEM = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being safe.  "
    "Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal content. "
    "Please ensure that your responses are socially unbiased and positive in nature.\n\nIf a question does not make "
    "any sense, or is not factually coherent, explain why instead of answering something not correct. If you don't "
    "know the answer to a question, please don't share false information.")
LLAVA_LLAMA_2_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual "
                        "content that the user provides, and assist the user with a variety of tasks using natural "
                        "language.")
FERRET_SYSTEM = ("A chat between a human and an AI that understands visuals. In images, [x, y] denotes points: "
                 "top-left [0, 0], bottom-right [width-1, height-1]. Increasing x moves right; y moves down. "
                 "Bounding box: [x1, y1, x2, y2]. Image size: 1000x1000. Follow instructions. ")

# The first nine are the strings of LLaVA's llava/conversation.py and Ferret's ferret/conversation.py,
# by name; `style` says how they are put together (their SeparatorStyle). The next three are the families'
# own chat formats as their Hugging Face chat templates write them; 'auto' is the tokenizer's own template.
TEMPLATES = {
    "plain": dict(style="plain", system="", sep="\n"),  # stage-1 alignment: <image> caption \n
    "vicuna_v1": dict(style="two", system=VICUNA_SYSTEM, roles=("USER", "ASSISTANT"), sep=" ", sep2="</s>"),
    "llava_v1": dict(style="two", system=LLAVA_SYSTEM, roles=("USER", "ASSISTANT"), sep=" ", sep2="</s>"),
    "ferret_v1": dict(style="two", system=FERRET_SYSTEM, roles=("USER", "ASSISTANT"), sep=" ", sep2="</s>"),
    "llama_2": dict(style="llama_2", system=LLAMA_2_SYSTEM, sep="<s>", sep2="</s>"),
    "llava_llama_2": dict(style="llama_2", system=LLAVA_LLAMA_2_SYSTEM, sep="<s>", sep2="</s>"),
    "mistral_instruct": dict(style="llama_2", system="", sep="", sep2="</s>"),
    "mpt": dict(style="mpt", roles=("<|im_start|>user\n", "<|im_start|>assistant\n"), sep="<|im_end|>",
                system="<|im_start|>system\nA conversation between a user and an LLM-based AI assistant. "
                       "The assistant gives helpful and honest answers."),
    "chatml_direct": dict(style="mpt", system="<|im_start|>system\nAnswer the questions.",
                          roles=("<|im_start|>user\n", "<|im_start|>assistant\n"), sep="<|im_end|>"),
    # Meta-Llama-3-Instruct: no default system prompt, contents trimmed, <|eot_id|> ends a turn
    "llama_3": dict(style="llama_3", system="", sep2="<|eot_id|>"),
    # Qwen2-Instruct's ChatML: a default system prompt, "<|im_end|>\n" after every turn
    "qwen2": dict(style="chatml", system="You are a helpful assistant.", sep2="<|im_end|>"),
    # Gemma: no system role (a system prompt opens the first user turn), the assistant is "model"
    "gemma": dict(style="gemma", system="", sep2="<end_of_turn>"),
    "auto": dict(style="auto"),
}
TEMPLATES["v1"] = TEMPLATES["vicuna_v1"]
# vicuna_v1 with the image after the question (not LLaVA's): under causal attention the image's tokens can then
# attend to the question, so each patch can answer "am I the circle?" itself (BENCHMARKS.md, issue 15, section 13)
TEMPLATES["vicuna_v1_image_last"] = dict(TEMPLATES["vicuna_v1"], image_at="last")
# the image both before and after the question: the question reads the image, as in LLaVA's order, and the second
# copy reads the question; one image file, two blocks of image tokens (BENCHMARKS.md, issue 15, section 14)
TEMPLATES["vicuna_v1_image_both"] = dict(TEMPLATES["vicuna_v1"], image_at="both")


def chat_template(version):
    """The template a run chats in: the last of `version`, which may list one template per data file
    (e.g. 'plain,vicuna_v1': captions, then conversations)."""
    return version.split(",")[-1]


def get_template(name):
    if name not in TEMPLATES:
        raise ValueError(f"unknown chat template {name!r}; known: {', '.join(sorted(TEMPLATES))}")
    return TEMPLATES[name]


def move_image(value, at="first"):
    """LLaVA's preprocess_multimodal: the <image> tag leaves its place, the rest is stripped, and the tag opens the
    message followed by a newline (at='last': closes it, after a newline; 'both': does both). A message with
    several tags (several images) keeps them in place."""
    if value.count(IMAGE_TOKEN) != 1:
        return value
    parts = [IMAGE_TOKEN] * (at != "last") + [value.replace(IMAGE_TOKEN, "").strip()] + [IMAGE_TOKEN] * (at != "first")
    return "\n".join(p for p in parts if p)


def image_order(template, messages):
    """For each <image> of the rendered text, in order, the index of the record's image it shows: 0, 1, ...,
    except that image_at='both' shows a message's one image twice."""
    t = get_template(template)
    twice = t.get("image_at") == "both" and t["style"] not in ("plain", "auto")
    order = []
    for m in messages:
        n, first = m["value"].count(IMAGE_TOKEN), (order[-1] + 1 if order else 0)
        order += [first, first] if twice and n == 1 else list(range(first, first + n))
    return order


def check_messages(messages, image_at="first"):
    """-> (system or None, [(question, reply or None)]), or a ValueError that says what is wrong."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("empty conversation")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("from") not in ("human", "gpt", "system") or \
                not isinstance(m.get("value"), str):
            raise ValueError(f"message {i} must be {{'from': 'human' | 'gpt' | 'system', 'value': str}}, got {m!r}")
    system = None
    if messages[0]["from"] == "system":
        system, messages = messages[0]["value"], messages[1:]
    if not messages:
        raise ValueError("a system message and nothing else")
    for i, m in enumerate(messages):
        if m["from"] != ("human", "gpt")[i % 2]:
            raise ValueError(f"message {i} is from {m['from']!r}: turns must go human, gpt, human, gpt, ... "
                             "(a system message may come first)")
        if not m["value"].strip():
            raise ValueError(f"message {i} ({m['from']}) is empty")
        if m["from"] == "gpt" and IMAGE_TOKEN in m["value"]:
            raise ValueError(f"message {i}: an assistant reply cannot hold {IMAGE_TOKEN}")
    values = [move_image(m["value"], image_at) for m in messages] + [None]
    return system, list(zip(values[0::2], values[1::2]))


def segments(template, messages, tokenizer=None):
    """Messages -> [(text, trained)]. If the last message is from the human, the text ends where the
    assistant's reply starts (the generation prompt). 'auto' needs the tokenizer (its chat template)."""
    t = get_template(template)
    if t["style"] == "auto":
        return auto_segments(messages, tokenizer)
    system, turns = check_messages(messages, t.get("image_at", "first"))
    system = t["system"] if system is None else system
    style, out = t["style"], []
    if style == "plain":  # LLaVA's preprocess_plain: the human turn is replaced by the image alone
        if len(turns) != 1 or IMAGE_TOKEN not in turns[0][0]:
            raise ValueError("the plain template takes one image and one caption: [human '<image>', gpt caption]")
        out.append((IMAGE_TOKEN, False))
        if turns[0][1] is not None:
            out.append((turns[0][1] + t["sep"], True))
    elif style == "two":  # SYSTEM USER: q ASSISTANT: a</s>USER: ...
        user, assistant = t["roles"]
        out.append((system + t["sep"], False))
        for q, a in turns:
            out.append((user + ": " + q + t["sep"] + assistant + ":", False))
            if a is not None:  # the space belongs to the reply: tokenizers attach it to the first word
                out.append((" " + a + t["sep2"], True))
    elif style == "llama_2":  # [INST] <<SYS>>\nsystem\n<</SYS>>\n\nq [/INST] a </s><s>[INST] ...
        for i, (q, a) in enumerate(turns):
            if i == 0 and system:
                q = f"<<SYS>>\n{system}\n<</SYS>>\n\n" + q
            out.append(((t["sep"] if i else "") + f"[INST] {q} [/INST]", False))  # LLaVA lstrips the first sep
            if a is not None:
                out.append((" " + a + " " + t["sep2"], True))
    # <|im_start|>system\n...<|im_end|><|im_start|>user\nq<|im_end|><|im_start|>assistant\na<|im_end|>
    elif style == "mpt":
        user, assistant = t["roles"]
        out.append((system + t["sep"], False))
        for q, a in turns:
            out.append((user + q + t["sep"] + assistant, False))
            if a is not None:
                out.append((a + t["sep"], True))
    elif style == "llama_3":
        head = lambda role: f"<|start_header_id|>{role}<|end_header_id|>\n\n"  # noqa: E731
        if system:
            out.append((head("system") + system.strip() + t["sep2"], False))
        for q, a in turns:
            out.append((head("user") + q.strip() + t["sep2"] + head("assistant"), False))
            if a is not None:
                out.append((a.strip() + t["sep2"], True))
    elif style == "chatml":
        out.append((f"<|im_start|>system\n{system}<|im_end|>\n", False))
        for q, a in turns:
            out.append((f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n", False))
            if a is not None:
                out += [(a + t["sep2"], True), ("\n", False)]
    elif style == "gemma":
        for i, (q, a) in enumerate(turns):
            prefix = system + "\n\n" if i == 0 and system else ""
            out.append((f"<start_of_turn>user\n{prefix}{q.strip()}<end_of_turn>\n<start_of_turn>model\n", False))
            if a is not None:
                out += [(a.strip() + t["sep2"], True), ("\n", False)]
    return merge(out)


def merge(segs):
    """Join neighbouring segments that are both trained or both not; drop empty ones."""
    out = []
    for text, trained in segs:
        if out and out[-1][1] == trained:
            out[-1] = (out[-1][0] + text, trained)
        elif text:
            out.append((text, trained))
    return out


def auto_segments(messages, tokenizer):
    """Segments from the tokenizer's own Hugging Face chat template. The template is a black box, so the
    replies are found by rendering: the text before reply k is the rendering of the turns before it with
    the generation prompt; the reply follows (maybe behind a space), then its end-of-turn marker (what the
    template writes after the reply, up to the next line break). A template that does not render
    conversations this way (one that rewrites earlier turns, say) cannot be masked exactly, and is refused."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("template 'auto' needs a tokenizer with a chat_template")
    system, turns = check_messages(messages)
    chat = [{"role": "system", "content": system}] if system is not None else []
    for q, a in turns:
        chat.append({"role": "user", "content": q})
        if a is not None:
            chat.append({"role": "assistant", "content": a})

    def render(upto, generation_prompt):
        return tokenizer.apply_chat_template(chat[:upto], tokenize=False, add_generation_prompt=generation_prompt)

    full = render(len(chat), chat[-1]["role"] == "user")
    out, pos = [], 0
    for k, m in enumerate(chat):
        if m["role"] != "assistant":
            continue
        before, after = render(k, True), render(k + 1, False)
        if not (full.startswith(before) and full.startswith(after) and len(before) >= pos):
            raise ValueError("the tokenizer's chat template renders a conversation differently from its first turns, "
                             "so its replies cannot be located: use a named template")
        # the reply, trimmed if the template trims, maybe behind a space the template writes (vicuna's
        # "ASSISTANT: "): the space goes with the reply, as tokenizers attach it to the first word
        for reply in (m["content"], m["content"].strip()):
            start = after.find(reply, len(before))
            if start >= 0 and (start == len(before) or after[len(before):start].isspace()):
                break
        else:
            raise ValueError(f"the tokenizer's chat template does not write assistant message {k} verbatim")
        end = start + len(reply)
        end += len(after[end:].split("\n")[0].rstrip())  # the end-of-turn marker
        out += [(full[pos:len(before)], False), (full[len(before):end], True)]
        pos = end
    out.append((full[pos:], False))
    return merge(out)


def render(template, messages, tokenizer=None):
    """The full training text of a conversation (or the generation prompt, if the human speaks last)."""
    return "".join(text for text, _ in segments(template, messages, tokenizer))


def stop_string(template, tokenizer=None):
    """The text that ends an assistant reply: generation stops there."""
    reply = [text for text, trained in segments(template, [{"from": "human", "value": IMAGE_TOKEN},
                                                          {"from": "gpt", "value": "X"}], tokenizer) if trained][0]
    marker = reply.partition("X")[2]
    return marker.strip() or marker  # plain's marker is the newline itself


def add_tokens(tokenizer, regions=False):
    """<image> (and with regions Ferret's <region_fea>) as special tokens, where the tokenizer lacks them."""
    new = [t for t in [IMAGE_TOKEN] + [REGION_TOKEN] * regions if t not in tokenizer.get_vocab()]
    tokenizer.add_special_tokens({"additional_special_tokens": new} if new else {})


def bos_ids(tokenizer):
    """[bos] if the tokenizer puts one in front of a text (Llama, Gemma), else [] (GPT-2, Qwen)."""
    bos = tokenizer.bos_token_id
    return [bos] if bos is not None and tokenizer("a")["input_ids"][:1] == [bos] else []


def encode(tokenizer, text, start):
    """ids and character offsets of text[start:] (the offsets count from the start of text). A piece that
    does not start the text is encoded behind a special token and without it: a SentencePiece tokenizer
    would otherwise put a word-start mark in front of it, as it does at the start of a text."""
    if start == 0:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return enc["input_ids"], enc["offset_mapping"]
    anchor = tokenizer.eos_token or tokenizer.all_special_tokens[0]
    enc = tokenizer(anchor + text[start:], add_special_tokens=False, return_offsets_mapping=True)
    if enc["input_ids"][:1] != [tokenizer.convert_tokens_to_ids(anchor)]:
        raise ValueError(f"cannot encode {text[start:]!r} on its own with this tokenizer")
    shift = start - len(anchor)
    return enc["input_ids"][1:], [(a + shift, b + shift) for a, b in enc["offset_mapping"][1:]]


def tokenize(template, messages, tokenizer, num_image_tokens=1):
    """Messages -> (input_ids, labels), LLaVA's preprocess_v1 / preprocess_plain / ... and
    tokenizer_image_token in one: labels equal input_ids on the replies and their end-of-turn marker,
    -100 elsewhere. Each <image> becomes num_image_tokens copies of the image token id. The ids are those
    of the whole rendered text (behind the tokenizer's BOS, if it uses one), except where a token would
    cross the edge of a reply: there the text is cut and each side encoded on its own."""
    segs = segments(template, messages, tokenizer)
    text = "".join(s for s, _ in segs)
    edges, flags, pos = [], [], 0  # where each segment starts, and whether it is trained
    for s, trained in segs:
        edges.append(pos)
        flags.append(trained)
        pos += len(s)
    cuts = [0]
    while True:
        ids, offsets = [], []
        for a, b in zip(cuts, cuts[1:] + [len(text)]):
            i, o = encode(tokenizer, text[:b], a)
            ids += i
            offsets += o
        crossed = sorted({e for e in edges[1:] for a, b in offsets if a < e < b} - set(cuts))
        if not crossed:
            break
        cuts = sorted(cuts + crossed)
    labels, k = [], 0
    for tok, (a, _) in zip(ids, offsets):  # a token belongs to the segment its first character is in
        while k + 1 < len(edges) and edges[k + 1] <= a:
            k += 1
        labels.append(tok if flags[k] else IGNORE_INDEX)
    if IMAGE_TOKEN in text:
        ids, labels = expand_images(ids, labels, tokenizer, text, num_image_tokens)
    bos = [] if get_template(template)["style"] == "auto" else bos_ids(tokenizer)  # 'auto' writes its own
    return bos + ids, [IGNORE_INDEX] * len(bos) + labels


def expand_images(ids, labels, tokenizer, text, num_image_tokens):
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if ids.count(image_id) != text.count(IMAGE_TOKEN) or image_id == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer does not keep {IMAGE_TOKEN} as one token: add it as a special token")
    out_ids, out_labels = [], []
    for tok, lab in zip(ids, labels):
        n = num_image_tokens if tok == image_id else 1
        out_ids += [tok] * n
        out_labels += [lab] * n
    return out_ids, out_labels
