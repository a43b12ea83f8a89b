"""eval.py: the answer matching behind the accuracies (exact match, Acc@0.5 for boxes)."""
import pytest

from eval import iou, is_correct


def test_iou():
    assert iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)
    assert iou([0, 0, 10, 10], [20, 20, 30, 30]) == 0.0
    assert iou([0, 0, 0, 0], [0, 0, 0, 0]) == 0.0


@pytest.mark.parametrize("prediction, answer, right", [
    ("red", "red", True),
    ("Red.", "red", True),
    (" two ", "two", True),
    ("red circle", "red", False),
    ("", "red", False),
    ("[100, 100, 300, 300]", "[100, 100, 300, 300]", True),
    ("It is at [120, 100, 300, 320].", "[100, 100, 300, 300]", True),  # IoU 0.79
    ("[100, 100, 200, 300]", "[100, 100, 300, 300]", True),  # IoU 0.5 exactly
    ("[100, 100, 199, 300]", "[100, 100, 300, 300]", False),  # just under 0.5
    ("[500, 500, 700, 700]", "[100, 100, 300, 300]", False),
    ("somewhere on the left", "[100, 100, 300, 300]", False),
])
def test_is_correct(prediction, answer, right):
    assert is_correct(prediction, answer) is right


@pytest.mark.parametrize("name", ["gpt2", "qwen", "llama"])
def test_stop_string_is_found_in_the_text_however_it_was_tokenized(real_tokenizers, name):
    import torch

    from sample import ends_with_text
    tok = real_tokenizers[name]
    merged = tok("It is red.</s>", add_special_tokens=False)["input_ids"]
    alone = tok("</s>", add_special_tokens=False)["input_ids"]
    if name != "llama":  # in context the string is other tokens than alone: fixed ids would never match
        assert merged[-len(alone):] != alone
    done = ends_with_text(tok, "</s>")
    batch = torch.tensor([merged, tok("It is red, and blue.", add_special_tokens=False)["input_ids"][:len(merged)]])
    assert done(batch).tolist() == [True, False]
