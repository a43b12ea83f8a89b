"""
Accuracy per question type on questions with known answers (run by train.py at the end, or on demand).

    python eval.py --out_dir=out-shapes

The question file is a JSON list of {"image", "type", "question", "answer"}, e.g.
data/shapes/val_questions.json; a question about a region (Ferret's referring) also has "boxes" (pixel
boxes for its <bbox_location{i}>), "image_w", "image_h" (their frame) and "region" ("box" or "point"), as in
data/shapes/ferret_val_questions.json. A box answer "[x1, y1, x2, y2]" counts as right when its IoU with
the true box is at least 0.5 (Acc@0.5, grounding); any other answer by exact match, ignoring case and a
final period.
Results go to <out_dir>/eval.json: question type -> accuracy, and the number of questions of each type.
"""
import json
import os
import sys

import torch

from conversation import BOX


def iou(a, b):
    w = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union if union > 0 else 0.0


def is_correct(prediction, answer):
    truth = BOX.fullmatch(answer.strip())
    if truth:
        pred = BOX.search(prediction)
        return bool(pred) and iou([int(v) for v in pred.groups()], [int(v) for v in truth.groups()]) >= 0.5
    return prediction.strip().rstrip(".").lower() == answer.strip().rstrip(".").lower()


@torch.no_grad()
def evaluate(model, tokenizer, path, image_folder, template, image_aspect_ratio, batch_size=100, max_new_tokens=32,
             no_coor=False, per_type=None):
    """-> {type: accuracy, ..., "n_questions": {type: count}}. no_coor: regions as their token alone (as trained);
    per_type: the first questions of each type only (train.py's curves)."""
    from sample import ask, image_args
    with open(path) as f:
        questions = json.load(f)
    if per_type:
        by_type = {}
        for q in questions:
            by_type.setdefault(q["type"], []).append(q)
        questions = [q for qs in by_type.values() for q in qs[:per_type]]
    was_training = model.training
    model.eval()
    right, total = {}, {}
    args = image_args(model, {"image_aspect_ratio": image_aspect_ratio})
    for i in range(0, len(questions), batch_size):
        qs = questions[i:i + batch_size]
        regions = [{"boxes": q["boxes"], "frame": [q["image_w"], q["image_h"]], "form": q.get("region") or "box"}
                   if q.get("boxes") else None for q in qs]
        images = [os.path.join(image_folder, q["image"]) if q.get("image") else None for q in qs]
        answers = ask(model, tokenizer, template, args, images, [q["question"] for q in qs], max_new_tokens,
                      regions=regions, no_coor=no_coor)
        for q, a in zip(qs, answers):
            right[q["type"]] = right.get(q["type"], 0) + is_correct(a, q["answer"])
            total[q["type"]] = total.get(q["type"], 0) + 1
    model.train(was_training)
    return {**{t: right[t] / total[t] for t in total}, "n_questions": total}


def report(results, path):
    """Print the accuracies as a table and write them to path (eval.json)."""
    print(f"{'question type':<14} {'accuracy':>8} {'n':>6}")
    for t, n in results["n_questions"].items():
        print(f"{t:<14} {results[t]:>8.3f} {n:>6}")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    from transformers import AutoTokenizer

    import configurator
    from checkpoint import WEIGHTS, load, newest
    from conversation import chat_template
    args = configurator.configure(dict(out_dir="out-shapes", ckpt="", eval_data_path="data/shapes/val_questions.json",
                                       eval_image_folder="data/shapes", device="cpu"), sys.argv[1:])
    ckpt = args["ckpt"] or newest(args["out_dir"], names=WEIGHTS)
    if ckpt is None:
        sys.exit(f"no checkpoint in {args['out_dir']}")
    model, config = load(ckpt, args["device"])
    results = evaluate(model, AutoTokenizer.from_pretrained(ckpt), args["eval_data_path"], args["eval_image_folder"],
                       chat_template(config["train"]["version"]), config["train"]["image_aspect_ratio"],
                       no_coor=config["train"].get("no_coor", False))
    report(results, os.path.join(os.path.dirname(ckpt), "eval.json"))
