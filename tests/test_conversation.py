"""conversation.py: LLaVA's exact prompt strings, and (input_ids, labels) with exact masks, checked
with the real byte-level BPE tokenizer of the shapes fixture."""
import json

import pytest

from conversation import IGNORE_INDEX, render, segments, stop_string, tokenize

# llava/conversation.py (haotian-liu/LLaVA), conv_vicuna_v1: system, roles USER/ASSISTANT, sep " ", sep2 "</s>"
VICUNA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the human's questions.")


def conv(*values, system=None):
    msgs = [{"from": "system", "value": system}] if system is not None else []
    return msgs + [{"from": ("human", "gpt")[i % 2], "value": v} for i, v in enumerate(values)]


def test_vicuna_v1_renders_llava_string():
    messages = conv("<image>\nWhat color is the circle?", "red", "How many shapes are there?", "two")
    expected = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                "helpful, detailed, and polite answers to the human's questions. "
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
    with pytest.raises(ValueError, match="alternate"):
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
    for i, l in zip(ids, labels):
        if l != IGNORE_INDEX:
            assert l == i
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
        prompt = [i for i, l in zip(ids, labels) if l == IGNORE_INDEX]
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
    assert tokenizer.decode([i for i, l in zip(ids, labels) if l != IGNORE_INDEX]) == " yes</s>"
