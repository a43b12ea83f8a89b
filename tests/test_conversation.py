"""conversation.py: the published prompt strings of LLaVA's and Ferret's templates (and the Llama 3, Qwen2
and Gemma formats), byte for byte; (input_ids, labels) with exact masks on the shapes tokenizer and on real
tokenizers (Llama/Mistral SentencePiece, GPT-2, Qwen, SmolLM2), including property-based tests over random
conversations for every template x tokenizer pair."""
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conversation import IGNORE_INDEX, TEMPLATES, bos_ids, image_order, render, segments, stop_string, tokenize

# llava/conversation.py (haotian-liu/LLaVA): conv_vicuna_v1 says "user", conv_llava_v1 says "human"
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
LLAVA_SYSTEM = VICUNA_SYSTEM.replace("user", "human")


def conv(*values, system=None):
    msgs = [{"from": "system", "value": system}] if system is not None else []
    return msgs + [{"from": ("human", "gpt")[i % 2], "value": v} for i, v in enumerate(values)]


def test_vicuna_v1_renders_llava_string():
    messages = conv("<image>\nWhat color is the circle?", "red", "How many shapes are there?", "two")
    expected = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                "helpful, detailed, and polite answers to the user's questions. "
                "USER: <image>\nWhat color is the circle? ASSISTANT: red</s>"
                "USER: How many shapes are there? ASSISTANT: two</s>")
    assert render("vicuna_v1", messages) == expected
    assert render("v1", messages) == expected


def test_plain_renders_image_caption_newline():
    assert render("plain", conv("<image>", "a red circle.")) == "<image>a red circle.\n"
    # LLaVA's preprocess_plain replaces the human turn by the image alone
    assert render("plain", conv("Describe this. <image>", "a red circle.")) == "<image>a red circle.\n"


def test_image_moves_to_the_front_followed_by_newline():
    text = render("vicuna_v1", conv("What is in the picture? <image>", "a square"))
    assert text == VICUNA_SYSTEM + " USER: <image>\nWhat is in the picture? ASSISTANT: a square</s>"
    text = render("vicuna_v1", conv("Look: <image> what is it?", "a square"))
    assert "USER: <image>\nLook:  what is it? ASSISTANT:" in text  # LLaVA only removes the tag and strips


def test_image_only_message_matches_llava():
    assert render("vicuna_v1", conv("<image>", "a square")) == VICUNA_SYSTEM + " USER: <image> ASSISTANT: a square</s>"


def test_generation_prompt_ends_with_assistant_colon():
    text = render("vicuna_v1", conv("<image>\nWhat shape?", "circle", "What color?"))
    assert text == VICUNA_SYSTEM + " USER: <image>\nWhat shape? ASSISTANT: circle</s>USER: What color? ASSISTANT:"
    assert render("plain", conv("<image>")) == "<image>"


def test_stop_strings():
    assert stop_string("vicuna_v1") == "</s>"
    assert stop_string("plain") == "\n"


def test_system_message_overrides_the_default():
    text = render("vicuna_v1", conv("Hi", "Hello", system="You are terse."))
    assert text == "You are terse. USER: Hi ASSISTANT: Hello</s>"


def test_trained_segments_are_exactly_the_replies():
    segs = segments("vicuna_v1", conv("<image>\nQ1", "A1", "Q2", "A2"))
    assert [t for t, trained in segs if trained] == [" A1</s>", " A2</s>"]
    assert [t for t, trained in segs if not trained] == [VICUNA_SYSTEM + " USER: <image>\nQ1 ASSISTANT:",
                                                          "USER: Q2 ASSISTANT:"]


@pytest.mark.parametrize("messages", [
    [{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}],
    [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}],
    [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}, {"from": "gpt", "value": "c"}],
    [{"from": "human", "value": "a"}, {"from": "system", "value": "b"}],
])
def test_non_alternating_turns_raise(messages):
    with pytest.raises(ValueError, match="turns must go human, gpt"):
        segments("vicuna_v1", messages)


def test_empty_conversation_and_unknown_template_raise():
    with pytest.raises(ValueError):
        segments("vicuna_v1", [])
    with pytest.raises(ValueError, match="unknown chat template"):
        render("chatml_nope", conv("a", "b"))
    with pytest.raises(ValueError):
        segments("plain", conv("no image here", "caption"))


def expanded(text, n):
    return text.replace("<image>", "<image>" * n)


def labelled_runs(ids, labels):
    """The contiguous runs of labelled positions, as id lists."""
    runs, cur = [], []
    for i, lab in zip(ids, labels):
        if lab != IGNORE_INDEX:
            assert lab == i
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


@pytest.mark.parametrize("num_image_tokens", [1, 5])
def test_ids_equal_whole_text_tokenization_for_all_train_records(shapes, tokenizer, num_image_tokens):
    records = json.loads((shapes / "train.json").read_text())
    assert len(records) == 2 * 96  # a conversation and a caption per image
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    for r in records:
        ids, labels = tokenize("vicuna_v1", r["conversations"], tokenizer, num_image_tokens)
        text = render("vicuna_v1", r["conversations"])
        assert ids == tokenizer(expanded(text, num_image_tokens))["input_ids"], r["id"]
        assert ids[0] == tokenizer.bos_token_id and ids.count(image_id) == num_image_tokens
        assert len(labels) == len(ids)


def test_labels_cover_exactly_the_replies_and_eos(shapes, tokenizer):
    records = json.loads((shapes / "train.json").read_text())
    for r in records:
        ids, labels = tokenize("vicuna_v1", r["conversations"], tokenizer, 4)
        replies = [m["value"] for m in r["conversations"] if m["from"] == "gpt"]
        runs = labelled_runs(ids, labels)
        assert [tokenizer.decode(run) for run in runs] == [" " + a + "</s>" for a in replies], r["id"]
        # everything else is the prompt, untrained
        prompt = [i for i, lab in zip(ids, labels) if lab == IGNORE_INDEX]
        assert len(prompt) + sum(map(len, runs)) == len(ids)
        assert tokenizer.eos_token_id not in prompt


def test_plain_template_tokens_and_labels(shapes, tokenizer):
    records = json.loads((shapes / "captions.json").read_text())
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    for r in records:
        ids, labels = tokenize("plain", r["conversations"], tokenizer, 3)
        caption = r["conversations"][1]["value"]
        assert ids == tokenizer(expanded("<image>" + caption + "\n", 3))["input_ids"]
        assert ids[:4] == [tokenizer.bos_token_id] + [image_id] * 3
        assert labels[:4] == [IGNORE_INDEX] * 4
        assert tokenizer.decode(ids[4:]) == caption + "\n" and labels[4:] == ids[4:]


def test_generation_prompt_tokens_have_no_labels(tokenizer):
    ids, labels = tokenize("vicuna_v1", conv("<image>\nWhat color is the circle?"), tokenizer, 2)
    assert set(labels) == {IGNORE_INDEX}
    assert tokenizer.decode(ids, skip_special_tokens=False).endswith("ASSISTANT:")
    assert ids == tokenizer(expanded(render("vicuna_v1", conv("<image>\nWhat color is the circle?")), 2))["input_ids"]


def test_system_override_tokenizes_the_same_as_the_text(tokenizer):
    messages = conv("<image>\nIs there a red circle?", "yes", system="Answer in one word.")
    ids, labels = tokenize("vicuna_v1", messages, tokenizer, 2)
    assert ids == tokenizer(expanded(render("vicuna_v1", messages), 2))["input_ids"]
    assert tokenizer.decode([i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]) == " yes</s>"


# --- the published templates, byte for byte ------------------------------------------------------------

LLAMA_2_SYSTEM = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being "
    "safe.  Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal "
    "content. Please ensure that your responses are socially unbiased and positive in nature.\n\nIf a question "
    "does not make any sense, or is not factually coherent, explain why instead of answering something not "
    "correct. If you don't know the answer to a question, please don't share false information.")
LLAVA_LLAMA_2_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual "
                        "content that the user provides, and assist the user with a variety of tasks using natural "
                        "language.")
FERRET_SYSTEM = ("A chat between a human and an AI that understands visuals. In images, [x, y] denotes points: "
                 "top-left [0, 0], bottom-right [width-1, height-1]. Increasing x moves right; y moves down. "
                 "Bounding box: [x1, y1, x2, y2]. Image size: 1000x1000. Follow instructions. ")
MPT_SYSTEM = ("<|im_start|>system\nA conversation between a user and an LLM-based AI assistant. The assistant gives "
              "helpful and honest answers.")
Q = "<image>\nWhat is this?"  # "What is this? <image>" after LLaVA's preprocessing

# template -> (two-turn training text, generation prompt for the first question)
PUBLISHED = {
    "vicuna_v1": (VICUNA_SYSTEM + f" USER: {Q} ASSISTANT: A cat.</s>USER: Color? ASSISTANT: Black.</s>",
                  VICUNA_SYSTEM + f" USER: {Q} ASSISTANT:"),
    "llava_v1": (LLAVA_SYSTEM + f" USER: {Q} ASSISTANT: A cat.</s>USER: Color? ASSISTANT: Black.</s>",
                 LLAVA_SYSTEM + f" USER: {Q} ASSISTANT:"),
    "ferret_v1": (FERRET_SYSTEM + f" USER: {Q} ASSISTANT: A cat.</s>USER: Color? ASSISTANT: Black.</s>",
                  FERRET_SYSTEM + f" USER: {Q} ASSISTANT:"),
    "llama_2": (f"[INST] <<SYS>>\n{LLAMA_2_SYSTEM}\n<</SYS>>\n\n{Q} [/INST] A cat. </s>"
                "<s>[INST] Color? [/INST] Black. </s>",
                f"[INST] <<SYS>>\n{LLAMA_2_SYSTEM}\n<</SYS>>\n\n{Q} [/INST]"),
    "llava_llama_2": (f"[INST] <<SYS>>\n{LLAVA_LLAMA_2_SYSTEM}\n<</SYS>>\n\n{Q} [/INST] A cat. </s>"
                      "<s>[INST] Color? [/INST] Black. </s>",
                      f"[INST] <<SYS>>\n{LLAVA_LLAMA_2_SYSTEM}\n<</SYS>>\n\n{Q} [/INST]"),
    "mistral_instruct": (f"[INST] {Q} [/INST] A cat. </s>[INST] Color? [/INST] Black. </s>", f"[INST] {Q} [/INST]"),
    "mpt": (MPT_SYSTEM + f"<|im_end|><|im_start|>user\n{Q}<|im_end|><|im_start|>assistant\nA cat.<|im_end|>"
            "<|im_start|>user\nColor?<|im_end|><|im_start|>assistant\nBlack.<|im_end|>",
            MPT_SYSTEM + f"<|im_end|><|im_start|>user\n{Q}<|im_end|><|im_start|>assistant\n"),
    "chatml_direct": (f"<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n{Q}<|im_end|>"
                      "<|im_start|>assistant\nA cat.<|im_end|><|im_start|>user\nColor?<|im_end|><|im_start|>assistant\n"
                      "Black.<|im_end|>",
                      f"<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n{Q}<|im_end|>"
                      "<|im_start|>assistant\n"),
    "llama_3": (f"<|start_header_id|>user<|end_header_id|>\n\n{Q}<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>"
                "\n\nA cat.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nColor?<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\nBlack.<|eot_id|>",
                f"<|start_header_id|>user<|end_header_id|>\n\n{Q}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"),
    "qwen2": (f"<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{Q}<|im_end|>\n"
              "<|im_start|>assistant\nA cat.<|im_end|>\n<|im_start|>user\nColor?<|im_end|>\n<|im_start|>assistant\n"
              "Black.<|im_end|>\n",
              f"<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{Q}<|im_end|>\n"
              "<|im_start|>assistant\n"),
    "gemma": (f"<start_of_turn>user\n{Q}<end_of_turn>\n<start_of_turn>model\nA cat.<end_of_turn>\n"
              "<start_of_turn>user\nColor?<end_of_turn>\n<start_of_turn>model\nBlack.<end_of_turn>\n",
              f"<start_of_turn>user\n{Q}<end_of_turn>\n<start_of_turn>model\n"),
}
STOP = {"vicuna_v1": "</s>", "llava_v1": "</s>", "ferret_v1": "</s>", "llama_2": "</s>", "llava_llama_2": "</s>",
        "mistral_instruct": "</s>", "mpt": "<|im_end|>", "chatml_direct": "<|im_end|>", "llama_3": "<|eot_id|>",
        "qwen2": "<|im_end|>", "gemma": "<end_of_turn>", "plain": "\n"}


@pytest.mark.parametrize("template", sorted(PUBLISHED))
def test_templates_render_the_published_text(template):
    text, prompt = PUBLISHED[template]
    assert render(template, conv("What is this? <image>", "A cat.", "Color?", "Black.")) == text
    assert render(template, conv("What is this? <image>")) == prompt
    assert stop_string(template) == STOP[template]
    # the trained text is each reply with its end-of-turn marker (and, in LLaVA's templates, their spaces)
    trained = [t for t, trained in segments(template, conv("What is this? <image>", "A cat.", "Color?", "Black."))
               if trained]
    assert [t.strip() for t in trained] == [
        f"{a}{' ' if template.endswith('llama_2') or template == 'mistral_instruct' else ''}{STOP[template]}"
        for a in ("A cat.", "Black.")]


def test_every_template_is_covered():
    assert set(PUBLISHED) | {"plain", "auto", "v1", "vicuna_v1_image_last", "vicuna_v1_image_both"} == set(TEMPLATES)


def test_image_last_puts_the_image_after_the_question_of_its_message_only():
    last = "vicuna_v1_image_last"
    text = render(last, conv("<image>\nWhat is this?", "A cat.", "Color?", "Black."))
    assert text == VICUNA_SYSTEM + " USER: What is this?\n<image> ASSISTANT: A cat.</s>USER: Color? ASSISTANT: " \
                                   "Black.</s>"
    assert render(last, conv("What is this? <image>")) == render(last, conv("<image>What is this?"))
    assert render(last, conv("What is this? <image>")).endswith(" USER: What is this?\n<image> ASSISTANT:")
    assert "USER: A <image> B <image> ASSISTANT:" in render(last, conv("A <image> B <image>"))  # several: in place


def test_image_both_shows_a_messages_one_image_before_and_after_its_question(tokenizer):
    both = "vicuna_v1_image_both"
    messages = conv("What is this? <image>", "A cat.", "Color?", "Black.")
    assert render(both, messages) == VICUNA_SYSTEM + " USER: <image>\nWhat is this?\n<image> ASSISTANT: A cat.</s>" \
                                                     "USER: Color? ASSISTANT: Black.</s>"
    assert image_order(both, messages) == [0, 0] and image_order("vicuna_v1", messages) == [0]
    several = conv("A <image> B <image>", "C.", "<image> D", "E.")
    assert "USER: A <image> B <image> ASSISTANT:" in render(both, several)  # several tags in a message: in place
    assert image_order(both, several) == [0, 1, 2, 2] and image_order("vicuna_v1", several) == [0, 1, 2]
    assert image_order(both, conv("<image>", "A cat.")) == [0, 0] and image_order("plain", conv("<image>", "A.")) == [0]
    ids, _ = tokenize(both, messages, tokenizer, num_image_tokens=3)
    assert ids.count(tokenizer.convert_tokens_to_ids("<image>")) == 6


def test_gemma_puts_the_system_prompt_in_the_first_user_turn_and_trims():
    text = render("gemma", conv("  Hi  ", " Hello ", system="Be brief."))
    assert text == "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n"
    assert render("llama_3", conv("Hi", "Hello", system="Be brief.")).startswith(
        "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>")
    assert render("qwen2", conv("Hi", "Hello", system="Be brief.")).startswith(
        "<|im_start|>system\nBe brief.<|im_end|>\n")


@pytest.mark.parametrize("messages, error", [
    ([{"from": "human", "value": ""}, {"from": "gpt", "value": "a"}], "empty"),
    ([{"from": "human", "value": "a"}, {"from": "gpt", "value": " \n\t"}], "message 1 \\(gpt\\) is empty"),
    ([{"from": "human", "value": "a"}, {"from": "gpt", "value": 3}], "must be"),
    ([{"from": "user", "value": "a"}, {"from": "gpt", "value": "b"}], "must be"),
    ([{"from": "human", "value": "a"}, {"from": "gpt", "value": "<image> b"}], "cannot hold"),
    ([{"from": "system", "value": "a"}], "nothing else"),
])
def test_bad_messages_raise_saying_what(messages, error):
    with pytest.raises(ValueError, match=error):
        segments("vicuna_v1", messages)


# --- real tokenizers -----------------------------------------------------------------------------------

REAL = ("llama", "gpt2", "qwen", "smollm2")
SPECIAL = ("<s>", "</s>", "<unk>", "<pad>", "<|", "|>", "<image>", "<start_of_turn>", "<end_of_turn>")


def collapse_images(ids, labels, image_id, n):
    """Undo the expansion of <image>: each run of n image ids becomes one (checking runs and labels)."""
    out_ids, out_labels, i = [], [], 0
    while i < len(ids):
        if ids[i] == image_id:
            assert ids[i:i + n] == [image_id] * n and labels[i:i + n] == [IGNORE_INDEX] * n
            i += n - 1
        out_ids.append(ids[i])
        out_labels.append(labels[i])
        i += 1
    return out_ids, out_labels


def check_exact(template, messages, tok, n=3):
    """The properties of tokenize that the issue asks for, checked against the tokenizer itself: labels copy
    the ids on the trained segments only (checked by decoding the ids up to every edge of a reply); the ids
    decode to the rendered text; and they equal the tokenization of the whole text unless the tokenizer
    merges characters across an edge of a reply there. Returns whether they equal the whole text's ids."""
    segs = segments(template, messages, tok)
    text = "".join(s for s, _ in segs)
    ids, labels = tokenize(template, messages, tok, n)
    assert len(ids) == len(labels) and all(lab in (i, IGNORE_INDEX) for i, lab in zip(ids, labels))
    bos = 0 if template == "auto" else len(bos_ids(tok))
    assert labels[:bos] == [IGNORE_INDEX] * bos
    ids, labels = collapse_images(ids[bos:], labels[bos:], tok.convert_tokens_to_ids("<image>"), n)
    assert ids.count(tok.convert_tokens_to_ids("<image>")) == text.count("<image>")
    decode = lambda x: tok.decode(x, skip_special_tokens=False, clean_up_tokenization_spaces=False)  # noqa: E731
    assert decode(ids) == text
    # runs of trained / untrained tokens line up with the segments, one for one
    runs, start = [], 0
    for k in range(1, len(ids) + 1):
        if k == len(ids) or (labels[k] == IGNORE_INDEX) != (labels[start] == IGNORE_INDEX):
            runs.append((k, labels[start] != IGNORE_INDEX))
            start = k
    edge, expected = 0, []
    for s, trained in segs:
        edge += len(s)
        expected.append((edge, trained))
    assert [(len(decode(ids[:k])), trained) for k, trained in runs] == expected
    assert all(decode(ids[:k]) == text[:e] for (k, _), (e, _) in zip(runs, expected))
    # the ids of the whole text, unless a token of it straddles an edge between segments
    whole = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    straddles = any(a < e < b for e, _ in expected[:-1] for a, b in whole["offset_mapping"])
    assert (ids == whole["input_ids"]) or straddles
    return ids == whole["input_ids"]


@pytest.mark.parametrize("name", REAL)
@pytest.mark.parametrize("template", sorted(PUBLISHED) + ["plain", "auto"])
def test_published_conversation_on_real_tokenizers(real_tokenizers, name, template):
    tok = real_tokenizers[name]
    messages = conv("What is this? <image>", "A cat.") if template == "plain" else \
        conv("What is this? <image>", "A cat.", "Color?", "Black.")
    whole = check_exact(template, messages, tok)
    # the ids are the whole text's, except where the template's end-of-turn marker is plain text to this
    # tokenizer and merges with what follows ("|><|" in "<|im_end|><|im_start|>" to GPT-2's BPE)
    assert whole or len(tok(stop_string(template, tok), add_special_tokens=False)["input_ids"]) > 1
    ids, labels = tokenize(template, messages, tok, 1)
    assert ids[:len(bos_ids(tok))] == bos_ids(tok) or template == "auto"
    trained = tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX], skip_special_tokens=False)
    assert "A cat." in trained and "What" not in trained


def test_llama_tokenizer_adds_bos_and_sentencepiece_word_marks(real_tokenizers):
    tok = real_tokenizers["llama"]
    ids, labels = tokenize("vicuna_v1", conv("Hi", "Hello there"), tok)
    assert ids[0] == tok.bos_token_id == 1 and labels[0] == IGNORE_INDEX
    first = labels.index(next(lab for lab in labels if lab != IGNORE_INDEX))
    # the reply's first token carries the space before it, as it does when the model generates it
    assert tok.convert_ids_to_tokens(ids[first:first + 3]) == ["▁Hello", "▁there", "</s>"]


def test_where_a_tokenizer_merges_across_a_reply_edge_the_text_is_cut_there(real_tokenizers):
    """Documented exception to "the ids of the whole text": Qwen's pre-tokenizer keeps "\\n\\n" together, so a
    reply that starts with a newline after ChatML's "assistant\\n" shares a token with the prompt. That token
    can be neither trained nor untrained, so the text is cut at the edge and each side encoded alone."""
    tok = real_tokenizers["qwen"]
    messages = conv("Hi", "\nHello")
    assert not check_exact("qwen2", messages, tok)
    ids, labels = tokenize("qwen2", messages, tok)
    whole = tok(render("qwen2", messages), add_special_tokens=False)["input_ids"]
    nl, nlnl = tok.convert_tokens_to_ids(["Ċ", "ĊĊ"])
    assert nlnl in whole and nlnl not in ids
    k = ids.index(nl, ids.index(tok.convert_tokens_to_ids("assistant")))
    assert (labels[k], labels[k + 1]) == (IGNORE_INDEX, nl)  # the prompt's "\n", then the reply's
    # GPT-2 has no <|im_end|> token: "|><|" between turns is one pre-token, cut at the end of the reply
    assert not check_exact("chatml_direct", conv("Hi", "Hello", "Again", "Bye"), real_tokenizers["gpt2"])
    # the same conversations on tokenizers that keep the edges apart: the whole text's ids
    assert check_exact("qwen2", messages, real_tokenizers["llama"])
    assert check_exact("chatml_direct", conv("Hi", "Hello", "Again", "Bye"), tok)


def test_auto_uses_the_tokenizers_own_template(real_tokenizers):
    tok = real_tokenizers["smollm2"]  # its GGUF carries a ChatML template with a SmolLM system prompt
    messages = conv("<image>\nWhat is this?", "A cat.", "Color?", "Black.")
    chat = [{"role": ("user", "assistant")[i % 2], "content": m["value"]} for i, m in enumerate(messages)]
    text = render("auto", messages, tok)
    assert text == tok.apply_chat_template(chat, tokenize=False)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert stop_string("auto", tok) == "<|im_end|>"
    ids, labels = tokenize("auto", messages, tok)
    runs = labelled_runs(ids, labels)
    assert [tok.decode(r) for r in runs] == ["A cat.<|im_end|>", "Black.<|im_end|>"]
    prompt = render("auto", conv("<image>\nWhat is this?"), tok)
    assert prompt == tok.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True)


def test_auto_with_a_jinja_vicuna_equals_vicuna_v1(real_tokenizers):
    import copy
    tok = copy.deepcopy(real_tokenizers["llama"])
    tok.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
        "{% set messages = messages[1:] %}"
        "{% else %}{% set system = '" + VICUNA_SYSTEM.replace("'", "\\'") + "' %}{% endif %}{{ system + ' ' }}"
        "{% for m in messages %}{% if m['role'] == 'user' %}{{ 'USER: ' + m['content'] + ' ' }}"
        "{% else %}{{ 'ASSISTANT: ' + m['content'] + '</s>' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
    for messages in (conv("What is this? <image>", "A cat.", "Color?", "Black."), conv("Hi", "Yo", system="Be brief.")):
        auto_ids, auto_labels = tokenize("auto", messages, tok, 2)
        ids, labels = tokenize("vicuna_v1", messages, tok, 2)
        assert auto_ids == ids[1:] and auto_labels == labels[1:]  # the Jinja above writes no BOS


@pytest.mark.parametrize("jinja, error", [
    # a template that writes the last turn differently from earlier ones (as reasoning templates do)
    ("{% for m in messages %}{% if loop.last %}[last]{% endif %}"
     "{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}",
     "differently"),
    ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] | upper + '\\n' }}{% endfor %}", "verbatim"),
])
def test_auto_refuses_a_template_it_cannot_mask_exactly(real_tokenizers, jinja, error):
    import copy
    tok = copy.deepcopy(real_tokenizers["gpt2"])
    tok.chat_template = jinja
    with pytest.raises(ValueError, match=error):
        tokenize("auto", conv("Hi", "hello", "Again", "bye"), tok)


# --- property-based: random conversations, every template x tokenizer ------------------------------------

def clean(s):
    return not any(t in s for t in SPECIAL) and s.strip()  # a blank message is a bad record (check_messages)


# control characters other than \t \n \r are left out: SmolLM2's vocabulary (from its GGUF) has no token for
# some of them, so no text with them decodes back, whatever the chat template
chars = st.one_of(st.characters(codec="utf-8", exclude_categories=("Cc", "Cs", "Co", "Cn")),
                  st.sampled_from([" ", "\n", "\t", "\r", ".", "é", "中", "🙂", "\u00a0"]))
text = st.lists(st.one_of(chars, st.sampled_from(["  ", "\n\n", " \n", "ab", " the", "123"])), min_size=1,
                max_size=8).map("".join).filter(clean)


@st.composite
def conversations(draw, template):
    """LLaVA messages: 1-6 turns, unicode, stray whitespace, tiny replies, <image> anywhere in the first
    question or no image at all, maybe a system prompt, maybe ending on a question."""
    if template == "plain":
        return conv(draw(st.sampled_from(["<image>", "<image>\n", "Describe <image>"])), draw(text))
    n = draw(st.integers(1, 6))
    values = [draw(text) for _ in range(2 * n - draw(st.integers(0, 1)))]
    if draw(st.booleans()):
        k = draw(st.integers(0, len(values[0])))
        values[0] = values[0][:k] + "<image>" + values[0][k:]
    system = draw(st.one_of(st.none(), text.filter(lambda s: not s[0].isspace())))
    return conv(*values, system=system)


@pytest.mark.parametrize("name", REAL)
@pytest.mark.parametrize("template", sorted(PUBLISHED) + ["plain", "auto"])
@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_random_conversations_are_masked_exactly(real_tokenizers, name, template, data):
    messages = data.draw(conversations(template))
    text = render(template, messages, real_tokenizers[name])
    if text[0].isspace() and name == "llama":  # SentencePiece writes a leading space and none alike
        return
    check_exact(template, messages, real_tokenizers[name])
