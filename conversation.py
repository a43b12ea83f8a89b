"""
Chat templates: LLaVA-format messages -> prompt text -> (input_ids, labels).

A conversation is a list of LLaVA messages, {"from": "human" | "gpt" | "system", "value": str}.
A template renders it as a list of segments (text, trained): the trained segments are exactly the
assistant replies and their end-of-turn marker. `tokenize` encodes each segment on its own and
concatenates, so the labels are exact by construction; there is no token counting that can drift
out of step with the tokenizer (LLaVA's "tokenization mismatch"). Segments are cut where byte-level
BPE pre-tokenizers cut anyway (before the space that starts a reply), so the ids equal those of the
whole text for such tokenizers.

This file knows nothing about tensors: it returns lists of ints.
"""

import functools

IMAGE_TOKEN = "<image>"
IGNORE_INDEX = -100

# The published strings of LLaVA's llava/conversation.py, by template name.
TEMPLATES = {
    # stage-1 alignment: "<image>" + caption + "\n", the caption is trained
    "plain": dict(style="plain", system="", roles=("", ""), sep="\n", sep2=None),
    "vicuna_v1": dict(
        style="two",
        system="A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's questions.",
        roles=("USER", "ASSISTANT"), sep=" ", sep2="</s>"),
}
TEMPLATES["v1"] = TEMPLATES["vicuna_v1"]


def chat_template(version):
    """The template a run chats in: the last of `version`, which may list one template per data file
    (e.g. 'plain,vicuna_v1': captions, then conversations)."""
    return version.split(",")[-1]


def get_template(name):
    if name not in TEMPLATES:
        raise ValueError(f"unknown chat template {name!r}; known: {', '.join(sorted(TEMPLATES))}")
    return TEMPLATES[name]


def move_image_first(value):
    """LLaVA's preprocessing: the <image> tag leaves its place and opens the message."""
    if IMAGE_TOKEN not in value:
        return value
    return (IMAGE_TOKEN + "\n" + value.replace(IMAGE_TOKEN, "").strip()).strip()


def segments(template, messages):
    """Messages -> [(text, trained)]. If the last message is from the human, the text ends where
    the assistant's reply starts (the generation prompt)."""
    t = get_template(template)
    system = t["system"]
    if messages and messages[0]["from"] == "system":
        system, messages = messages[0]["value"], messages[1:]
    for i, m in enumerate(messages):
        if m["from"] != ("human", "gpt")[i % 2]:
            raise ValueError(f"message {i} is from {m['from']!r}: turns must alternate human, gpt, ...")
    if not messages:
        raise ValueError("empty conversation")
    if t["style"] == "plain":
        # LLaVA's preprocess_plain: the human turn is replaced by the image alone
        if len(messages) not in (1, 2) or IMAGE_TOKEN not in messages[0]["value"]:
            raise ValueError("the plain template takes one image and one caption: [human '<image>', gpt caption]")
        out = [(IMAGE_TOKEN, False)]
        if len(messages) == 2:
            out.append((messages[1]["value"] + t["sep"], True))
        return out
    # "two": SYSTEM<sep>USER: question<sep>ASSISTANT: answer<sep2>USER: ...
    user, assistant = t["roles"]
    out = []
    for i, m in enumerate(messages):
        if i % 2 == 0:
            prefix = system + t["sep"] if i == 0 else ""
            out.append((prefix + user + ": " + move_image_first(m["value"]) + t["sep"] + assistant + ":", False))
        else:
            out.append((" " + m["value"] + t["sep2"], True))
    return out


def render(template, messages):
    return "".join(text for text, _ in segments(template, messages))


def stop_string(template):
    """The text that ends an assistant reply (generation stops there)."""
    t = get_template(template)
    return t["sep"] if t["style"] == "plain" else t["sep2"]


@functools.lru_cache(maxsize=1 << 16)
def encode_text(tokenizer, vocab_size, text):
    """Cached: system prompts and questions repeat across records. vocab_size is part of the key, so
    adding tokens to the tokenizer starts afresh."""
    return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode(text, tokenizer, image_token_id, num_image_tokens):
    """Text -> ids, with each <image> expanded to num_image_tokens copies of image_token_id."""
    ids = []
    for j, part in enumerate(text.split(IMAGE_TOKEN)):
        if j > 0:
            ids += [image_token_id] * num_image_tokens
        if part:
            ids += encode_text(tokenizer, len(tokenizer), part)
    return ids


@functools.lru_cache(maxsize=64)
def bos_ids(tokenizer, vocab_size):
    """[bos] if the tokenizer puts one in front of a text (Llama), else [] (GPT-2)."""
    bos = tokenizer.bos_token_id
    return [bos] if bos is not None and tokenizer("a")["input_ids"][:1] == [bos] else []


def tokenize(template, messages, tokenizer, num_image_tokens=1):
    """Messages -> (input_ids, labels): labels equal input_ids on the trained segments, -100 elsewhere."""
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    input_ids = list(bos_ids(tokenizer, len(tokenizer)))
    labels = [IGNORE_INDEX] * len(input_ids)
    for text, trained in segments(template, messages):
        ids = encode(text, tokenizer, image_token_id, num_image_tokens)
        input_ids += ids
        labels += ids if trained else [IGNORE_INDEX] * len(ids)
    return input_ids, labels
