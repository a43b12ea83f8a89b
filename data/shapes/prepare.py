"""
The built-in "shapes" dataset: synthetic images with 1-3 shapes and questions about them.

    python data/shapes/prepare.py            # writes data/shapes/{images/,*.json,tokenizer/}

Deterministic from --seed. Each image holds 1-3 non-overlapping shapes of different kinds and
colors (so "the circle" and "the red shape" name one shape each), of varied size and position, on
a gray background of varied shade. Files, all LLaVA-format JSON:
  train.json, val.json      per image: a caption, and a conversation of color, shape, count,
                            exists and grounding questions
  captions.json             one caption per train image, for stage-1 alignment with the plain template
  colors.json               one "What color is the <shape>?" per train image of 2-3 shapes, a conversation of its
                            own: the binding's stage between the captions and the conversations
  questions.json            train.json's questions (the caption's too), each a conversation of its own, so
                            that an image after its question (vicuna_v1_image_last) comes after every question
  val_questions.json        single questions with their type and answer, for eval.py
  ferret_train.json, ferret_val.json
                            per image, Ferret's GRIT format: referring questions about a region
                            ("What is in <bbox_location0>?" -> "a blue square", the region a box or a point
                            as data.py draws it) and grounding ("Where is the blue square?" -> its box)
  ferret_val_questions.json single referring (box and point) and grounding questions, for eval.py
  tokenizer/                a byte-level BPE trained on the text of train.json (digits split one by one)
train.py runs this script by itself when the default data is missing.
"""
import argparse
import json
import multiprocessing
import os
import random
import sys

from PIL import Image, ImageDraw

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from conversation import render  # noqa: E402

SHAPES = ["circle", "square", "triangle"]
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
          "yellow": (235, 210, 40), "purple": (140, 60, 190), "orange": (245, 140, 30)}
NUMBERS = ["zero", "one", "two", "three"]
# the questions, written once: the training conversations ask them as the eval does
ASK = {"color": "What color is the {shape}?", "shape": "What shape is the {color} object?",
       "count": "How many shapes are there?", "exists": "Is there a {color} {shape}?",
       "grounding": "Where is the {color} {shape}?", "caption": "Describe the image."}
BINDING_WEIGHTS = [0.4, 0.2, 0.2, 0.2]  # color, shape, exists, grounding: how often each is asked of an object
SUPERSAMPLE = 4  # draw large, then downsample: antialiased edges like a real photo


def place_shapes(rng, size):
    """1-3 (shape, color, box) with distinct shapes, distinct colors and boxes that do not touch."""
    n = rng.randint(1, 3)
    shapes, colors = rng.sample(SHAPES, n), rng.sample(list(COLORS), n)
    objects = []
    for shape, color in zip(shapes, colors):
        for _ in range(100):
            s = rng.randint(size // 4, size // 2)
            x, y = rng.randint(1, size - s - 1), rng.randint(1, size - s - 1)
            box = (x, y, x + s, y + s)
            if all(box[2] + 2 <= b[0] or b[2] + 2 <= box[0] or box[3] + 2 <= b[1] or b[3] + 2 <= box[1]
                   for _, _, b in objects):
                objects.append((shape, color, box))
                break
    return objects


def draw(objects, size, shade):
    k = SUPERSAMPLE
    img = Image.new("RGB", (size * k, size * k), (shade, shade, shade))
    d = ImageDraw.Draw(img)
    for shape, color, (x1, y1, x2, y2) in objects:
        x1, y1, x2, y2 = x1 * k, y1 * k, x2 * k - 1, y2 * k - 1
        if shape == "circle":
            d.ellipse((x1, y1, x2, y2), fill=COLORS[color])
        elif shape == "square":
            d.rectangle((x1, y1, x2, y2), fill=COLORS[color])
        else:
            d.polygon([((x1 + x2) / 2, y1), (x2, y2), (x1, y2)], fill=COLORS[color])
    return img.resize((size, size), Image.LANCZOS)


def save_drawing(job):
    objects, size, shade, path = job
    draw(objects, size, shade).save(path)


def box_text(box, size):
    """Pixel box -> '[x1, y1, x2, y2]' on Ferret's 0-999 grid (x right, y down)."""
    return "[" + ", ".join(str(min(999, v * 1000 // size)) for v in box) + "]"


def caption(objects):
    """Left to right, e.g. 'a red circle and a blue square.'"""
    names = [name(shape, color) for shape, color, _ in sorted(objects, key=lambda o: o[2][0])]
    return (", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]) + "."


def questions(rng, objects, size):
    """One question of each type about this image: [(type, question, answer)]."""
    shape, color, box = rng.choice(objects)
    present = {(s, c) for s, c, _ in objects}
    if rng.random() < 0.5:
        ask_shape, ask_color, answer = shape, color, "yes"
    else:  # a pair that is absent, often with a shape or color that is present, so binding matters
        absent = [(s, c) for s in SHAPES for c in COLORS if (s, c) not in present]
        ask_shape, ask_color = rng.choice(absent)
        answer = "no"
    s2, c2, b2 = rng.choice(objects)
    return [
        ("color", ASK["color"].format(shape=shape), color),
        ("shape", ASK["shape"].format(color=c2), s2),
        ("count", ASK["count"], NUMBERS[len(objects)]),
        ("exists", ASK["exists"].format(color=ask_color, shape=ask_shape), answer),
        ("grounding", ASK["grounding"].format(color=c2, shape=s2), box_text(b2, size)),
        ("caption", ASK["caption"], caption(objects)),
    ]


def conversation(rng, objects, size):
    """1-4 questions for one training conversation, none of which gives its answer away to another: each
    object is named (its shape or its color, in a question or an answer) by one question at most, since a
    question that ties a shape to a color ("Is there a red circle?", "Where is the red circle?") would tell
    the answer of "What color is the circle?" asked after it. A question per object, color-of-shape the
    most often (the binding learned last); the count, which names no object, in one conversation of three."""
    present = {(s, c) for s, c, _ in objects}
    turns, named = [], set()
    for shape, color, box in rng.sample(objects, len(objects)):
        kind = rng.choices(["color", "shape", "exists", "grounding"], weights=BINDING_WEIGHTS)[0]
        if kind == "exists" and rng.random() < 0.5:  # a pair that is absent, often with a shape or color present
            shape, color = rng.choice([(s, c) for s in SHAPES for c in COLORS if (s, c) not in present])
        touched = {i for i, (s, c, _) in enumerate(objects) if s == shape or c == color}
        if touched & named:
            continue
        named |= touched
        answer = {"color": color, "shape": shape, "exists": "yes" if (shape, color) in present else "no",
                  "grounding": box_text(box, size)}[kind]
        turns.append((ASK[kind].format(shape=shape, color=color), answer))
    if not turns or rng.random() < 1 / 3:
        turns.insert(rng.randint(0, len(turns)), (ASK["count"], NUMBERS[len(objects)]))
    return turns


def ferret_record(rng, objects, size, record_id, image):
    """A GRIT record: 1-3 referring turns (a region in, its object out) and a grounding turn (an object in,
    its box out), in random order. Box i of a message fills its <bbox_location{i}>."""
    qas = [("What is in <bbox_location0>?", name(s, c), [box], [])
           for s, c, box in rng.sample(objects, rng.randint(1, len(objects)))]
    s, c, box = rng.choice(objects)
    qas.insert(rng.randint(0, len(qas)), (ASK["grounding"].format(color=c, shape=s), "<bbox_location0>", [], [box]))
    return {"id": record_id, "image": image, "image_w": size, "image_h": size,
            "conversations": turns([qa[:2] for qa in qas]),
            "box_x1y1x2y2": [list(b) for qa in qas for b in (qa[2], qa[3])]}


def ferret_questions(objects, size, record_id, image):
    """Single questions for eval.py: referring by box and by point (its center), grounding."""
    s, c, box = objects[0]
    q = {"id": record_id, "image": image, "image_w": size, "image_h": size, "boxes": [list(box)]}
    return [{**q, "type": "referring", "region": "box", "question": "What is in <bbox_location0>?",
             "answer": name(s, c)},
            {**q, "type": "referring_point", "region": "point", "question": "What is in <bbox_location0>?",
             "answer": name(s, c)},
            {**q, "boxes": [], "type": "grounding", "question": ASK["grounding"].format(color=c, shape=s),
             "answer": box_text(box, size)}]


def name(shape, color):
    return ("an " if color[0] in "aeiou" else "a ") + f"{color} {shape}"


def turns(qas):
    """[(question, answer)] -> LLaVA messages, the image tag in the first question."""
    out = []
    for i, (q, a) in enumerate(qas):
        out += [{"from": "human", "value": ("<image>\n" if i == 0 else "") + q}, {"from": "gpt", "value": a}]
    return out


def build_split(rng, split, n, size, out, seed):
    """Per image: a conversation (see conversation), and its caption as a record of its own (a
    caption names every shape: in the same conversation, answers could be copied from it instead of
    read off the image). captions.json holds the captions again in the plain template: every word of a
    caption depends on the image, so training on them first teaches the model to look."""
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    records, captions, colors, turned, single, ferret, ferret_single, drawings = [], [], [], [], [], [], [], []
    for i in range(n):
        objects = place_shapes(rng, size)
        image = f"images/{split}_{i:06d}.png"
        drawings.append((objects, size, rng.randint(60, 200), os.path.join(out, image)))
        qs = questions(rng, objects, size)
        chat = conversation(random.Random(f"{seed}-chat-{split}-{i}"), objects, size)
        records += [{"id": f"{split}_{i}", "image": image, "conversations": turns(chat)},
                    {"id": f"{split}_{i}_caption", "image": image, "conversations": turns([qs[-1][1:]])}]
        captions.append({"id": f"{split}_{i}", "image": image, "conversations": [
            {"from": "human", "value": "<image>"}, {"from": "gpt", "value": qs[-1][2]}]})
        if len(objects) > 1:  # with one object, naming any color of the image is right: nothing to bind
            # a generator of its own: the other files stay the same
            shape, color, _ = random.Random(f"{seed}-color-{split}-{i}").choice(objects)
            colors.append({"id": f"{split}_{i}_color", "image": image,
                           "conversations": turns([(ASK["color"].format(shape=shape), color)])})
        turned += [{"id": f"{split}_{i}_{k}", "image": image, "conversations": turns([qa])}
                   for k, qa in enumerate(chat + [qs[-1][1:]])]
        single += [{"id": f"{split}_{i}_{t}", "image": image, "type": t, "question": q, "answer": a} for t, q, a in qs]
        # Ferret's records draw from a generator of their own: the files above stay what they were
        ferret.append(ferret_record(random.Random(f"{seed}-ferret-{split}-{i}"), objects, size, f"{split}_{i}_ferret",
                                    image))
        ferret_single += ferret_questions(objects, size, f"{split}_{i}", image)
    with multiprocessing.get_context("fork").Pool(os.cpu_count()) as pool:  # the drawing is most of the time
        pool.map(save_drawing, drawings, chunksize=256)
    return records, captions, colors, turned, single, ferret, ferret_single


def train_tokenizer(texts, path, vocab_size):
    """A byte-level BPE like GPT-2's, except that digits are split one by one (as Llama's tokenizer
    does), so a coordinate is three tokens from a 10-way choice each."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    specials = ["<pad>", "<s>", "</s>", "<image>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            extra_special_tokens=["<image>"]).save_pretrained(path)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    p.add_argument("--train", type=int, default=40000, help="train images")
    p.add_argument("--val", type=int, default=500, help="val images")
    p.add_argument("--size", type=int, default=48, help="image side in pixels")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--vocab_size", type=int, default=512)
    a = p.parse_args()
    rng = random.Random(a.seed)
    files = {}
    files["train.json"], files["captions.json"], files["colors.json"], files["questions.json"], _, \
        files["ferret_train.json"], _ = build_split(rng, "train", a.train, a.size, a.out, a.seed)
    files["val.json"], _, _, _, files["val_questions.json"], files["ferret_val.json"], \
        files["ferret_val_questions.json"] = build_split(rng, "val", a.val, a.size, a.out, a.seed)
    texts = [render("vicuna_v1", r["conversations"]) for r in files["train.json"]]
    train_tokenizer(texts, os.path.join(a.out, "tokenizer"), a.vocab_size)
    for name, records in files.items():  # the JSON last: its presence means the split is complete
        with open(os.path.join(a.out, name + ".tmp"), "w") as f:
            # dumps, then write: json.dump encodes in Python, five times slower
            f.write(json.dumps(records, indent=None if not name.endswith("val_questions.json") else 0))
        os.replace(os.path.join(a.out, name + ".tmp"), os.path.join(a.out, name))
    print(f"wrote {a.train} train and {a.val} val images with "
          f"{sum(len(r['conversations']) // 2 for r in files['train.json'])} train questions to {a.out}")


if __name__ == "__main__":
    main()
