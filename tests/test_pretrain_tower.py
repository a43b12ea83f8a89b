"""pretrain_tower.py: the caption's word pairs as classes, and a tower taught on them learns which images hold which
pair (the shapes fixture's real captions and images)."""
import json

import pytest
import torch

from model import VisionTower, VLMConfig
from pretrain_tower import caption_pairs, caption_records, pair_classes, pair_scores, pair_targets, teach_tower


def test_caption_pairs_are_adjacent_words_without_punctuation_or_function_words():
    assert caption_pairs("An orange circle, a blue square and a red triangle.") == \
        ["orange circle", "blue square", "red triangle"]
    assert caption_pairs("A brown dog runs on green grass") == ["brown dog", "dog runs", "green grass"]
    assert caption_pairs("a square.") == []


def test_pair_classes_count_captions_not_repeats_and_targets_mark_the_caption_pairs():
    captions = ["a blue square and a blue square.", "a red circle.", "a red circle and a green triangle."]
    assert pair_classes(captions, 3) == ["red circle", "blue square", "green triangle"]  # ties: first seen first
    index = {p: k for k, p in enumerate(pair_classes(captions, 2))}
    assert pair_targets(["a blue square.", "a green triangle."], index).tolist() == [[0.0, 1.0], [0.0, 0.0]]


def test_caption_records_need_an_image_and_one_reply(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps([{"id": "1", "conversations": [{"from": "human", "value": "hi"},
                                                               {"from": "gpt", "value": "hello"}]}]))
    with pytest.raises(ValueError, match=r"c\.json: no records with an image"):
        caption_records(str(path), str(tmp_path))


def test_a_taught_tower_scores_the_pairs_an_image_holds_above_those_it_does_not(shapes):
    """Per (color, shape) pair, the images of the fixture whose caption names it score higher than those whose
    caption does not (ROC AUC, which a class's bias cannot move): 0.5 for the random tower, well above after."""
    items = caption_records(str(shapes / "captions.json"), str(shapes))
    torch.manual_seed(0)
    tower = VisionTower(VLMConfig().vision_tower, select_layer=-1)  # the default's
    args = ("pad", tower.image_size, tower.image_mean, tower.image_std)
    seen = []
    head, index = teach_tower(tower, items, args, steps=60, batch_size=16, lr=2e-3, device="cpu", seed=0, every=30,
                              report=lambda step, loss, *_: seen.append((step, loss)))
    assert [s for s, _ in seen] == [30, 60] and not any(p.requires_grad for p in tower.parameters())
    assert all(p.grad is None for p in tower.parameters())  # none left to count in train.py's gradient norm
    from data import load_image
    pixels = torch.stack([load_image(path, *args) for path, _ in items])
    with torch.no_grad():
        scores = pair_scores(tower, head, pixels)
    targets = pair_targets([c for _, c in items], index)
    aucs = []
    for pair, k in index.items():
        pos, neg = scores[targets[:, k] == 1, k], scores[targets[:, k] == 0, k]
        if len(pos) >= 5 and len(neg) >= 5:
            aucs.append((pos[:, None] > neg[None, :]).float().mean().item())
    assert len(aucs) >= 10 and sum(aucs) / len(aucs) > 0.75, aucs
