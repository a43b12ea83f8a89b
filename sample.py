"""
Ask a trained model about an image, or about a region of it (Ferret).

    python sample.py --out_dir=out-shapes --image=path.png --prompt="What color is the circle?"
    python sample.py --out_dir=out-shapes-ferret --image=path.png --prompt="What is in <bbox_location0>?" \
        --box=10,12,30,40 --out_png=answer.png

Loads the newest checkpoint in out_dir (or --ckpt=<checkpoint folder>) with its tokenizer, chat
template and image settings. temperature=0 decodes greedily. A region is given in pixels of the image,
as a box (--box=x1,y1,x2,y2) or a point (--point=x,y), at the prompt's <bbox_location0> (or after it); it
goes in as Ferret's text, "[x1, y1, x2, y2] <region_fea>" on the 0-999 grid, and, for a model with a region
sampler, as its features. --out_png writes a picture to look at: the image scaled up to at least 512
pixels (nearest, so a 48x48 image's pixels stay sharp), the region (blue) and any boxes of the answer (red)
drawn on it, and the question and answer written below.
"""
import math
import sys
import textwrap

import torch
from transformers import AutoTokenizer

import configurator
from checkpoint import WEIGHTS, load, newest
from conversation import BOX, chat_template, image_order, stop_string, tokenize
from data import image_tensor, open_image, region_mask
from ferret import place_regions  # Ferret


def ask(model, tokenizer, template, image_args, images, questions, max_new_tokens=64, temperature=0.0, top_p=0.9,
        generator=None, regions=None, no_coor=False):
    """One answer per (image path or None, question), generated as one left-padded batch. regions: per
    question None, or {"boxes": [[x1, y1, x2, y2] in pixels], "frame": [image_w, image_h] of the boxes,
    "form": "box" | "point"} for its <bbox_location{i}> placeholders (a point is its box's center), written
    as the model was trained to read them (no_coor: the region token alone)."""
    device = next(model.parameters()).device
    mode, size = image_args[:2]
    prompts, pixels, masks, mask_image = [], [], [], []
    for path, question, region in zip(images, questions, regions or [None] * len(questions)):
        messages = [{"from": "human", "value": ("<image>\n" if path else "") + question}]
        img = open_image(path) if path else None
        placed = []
        if region:  # Ferret: the region as its text (and its <region_fea> token)
            if not path:
                raise ValueError(f"a region needs an image: {question!r} has none")
            record = {"image_w": region["frame"][0], "image_h": region["frame"][1], "box_x1y1x2y2": [region["boxes"]]}
            messages, placed = place_regions(record, messages, None, model.region_sampler is not None, no_coor,
                                             point_input_sample="center", form=region["form"])
        prompts.append(tokenize(template, messages, tokenizer, model.num_image_tokens)[0])
        masks += [region_mask(r, region["frame"], img.size, mode, size) for r in placed]  # Ferret
        mask_image += [len(pixels)] * len(placed)
        pixels += [image_tensor(img, *image_args)] * len(image_order(template, messages)) if img else []
    input_ids, attention_mask = left_pad(prompts, tokenizer.pad_token_id)
    stop = stop_string(template, tokenizer)
    # on a GPU in bf16 autocast over the fp32 weights, whatever dtype trained them (a CPU stays in float32)
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
        new = model.generate(input_ids.to(device), attention_mask.to(device),
                             torch.stack(pixels).to(device) if pixels else None, max_new_tokens, temperature, top_p,
                             {tokenizer.eos_token_id}, generator, stop=ends_with_text(tokenizer, stop),
                             region_masks=torch.stack(masks).to(device) if masks else None,
                             region_image=torch.tensor(mask_image, device=device) if masks else None)
    texts = tokenizer.batch_decode(new.tolist(), skip_special_tokens=True)
    return [t.split(stop)[0].strip() for t in texts]


def left_pad(prompts, pad_token_id):
    """Token id lists -> (input_ids, attention_mask) [B, longest], padded on the left, as generate takes them."""
    T = max(map(len, prompts))
    input_ids = torch.full((len(prompts), T), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, p in enumerate(prompts):
        input_ids[i, T - len(p):], attention_mask[i, T - len(p):] = torch.tensor(p), 1
    return input_ids, attention_mask


def ends_with_text(tokenizer, stop):
    """generate's stop test for a stop string, matched in the decoded text of the last tokens: in context a
    tokenizer may write it with other tokens than alone (GPT-2 ends '.</s>' with '.</', 's', '>')."""
    def done(new):
        tails = tokenizer.batch_decode(new[:, -len(stop) - 2:].tolist())  # a token is at least one character
        return torch.tensor([stop in t for t in tails])
    return done


def image_args(model, train_config):
    t = model.vision_tower
    return (train_config.get("image_aspect_ratio", "pad"), t.image_size, t.image_mean, t.image_std)


def draw(path, region, answer, out, question, long_side=512):
    """A picture to look at: the image scaled up (nearest neighbour, each pixel a visible square) to at least
    long_side on its long side, the region (blue: a box, or a point's dot) and the answer's boxes (red, from the
    0-999 grid back to pixels) drawn on it, and the question and the answer written below."""
    from PIL import Image, ImageDraw, ImageFont
    img = open_image(path)
    k = max(1, math.ceil(long_side / max(img.size)))
    w, h = img.width * k, img.height * k
    font = ImageFont.load_default(size=max(14, w // 30))
    chars = max(20, int(w / (0.5 * font.size)))  # about the characters a line holds
    lines = textwrap.wrap(f"Q: {question}", chars) + textwrap.wrap(f"A: {answer}", chars)
    pitch = round(1.3 * font.size)
    canvas = Image.new("RGB", (w, h + pitch * len(lines) + pitch // 2), "white")
    canvas.paste(img.resize((w, h), Image.NEAREST))
    d = ImageDraw.Draw(canvas)
    line = max(2, round(min(w, h) / 100))
    if region and region["form"] == "point":
        x, y = [(a + b) / 2 * k for a, b in zip(region["boxes"][0][:2], region["boxes"][0][2:])]
        d.ellipse([x - 2 * line, y - 2 * line, x + 2 * line, y + 2 * line], fill=(40, 80, 255))
    elif region:
        d.rectangle([v * k for v in region["boxes"][0]], outline=(40, 80, 255), width=line)
    for box in BOX.findall(answer):
        x1, y1, x2, y2 = (int(v) / 1000 * s for v, s in zip(box, (w, h, w, h)))
        d.rectangle([x1, y1, x2, y2], outline=(255, 40, 40), width=line)
    for i, text in enumerate(lines):
        d.text((pitch // 3, h + pitch // 4 + i * pitch), text, fill="black", font=font)
    canvas.save(out)
    return k


if __name__ == "__main__":
    args = configurator.configure(dict(out_dir="out-shapes", ckpt="", image="", prompt="Describe the image.", box="",
                                       point="", out_png="", max_new_tokens=64, temperature=0.0, top_p=0.9, seed=1337,
                                       device="cpu"), sys.argv[1:])
    ckpt = args["ckpt"] or newest(args["out_dir"], names=WEIGHTS)
    if ckpt is None:
        sys.exit(f"no checkpoint in {args['out_dir']}: train one first (python train.py)")
    model, config = load(ckpt, args["device"])
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    train = config.get("train", {})
    # a Hugging Face LLaVA folder has no run config: its own chat template
    own = "auto" if tokenizer.chat_template else "vicuna_v1"
    template = chat_template(train["version"]) if "version" in train else own
    region, prompt = None, args["prompt"]
    if args["box"] or args["point"]:  # Ferret: a region to ask about
        if not args["image"]:
            sys.exit("a region needs --image")
        v = [float(x) for x in str(args["box"] or args["point"]).strip("()[] ").split(",")]
        if len(v) != (4 if args["box"] else 2):
            sys.exit("--box=x1,y1,x2,y2 or --point=x,y, in pixels")
        w, h = open_image(args["image"]).size
        region = {"boxes": [v if args["box"] else v * 2], "frame": [w, h], "form": "box" if args["box"] else "point"}
        prompt = prompt if "<bbox_location0>" in prompt else prompt + " <bbox_location0>"
    generator = torch.Generator(args["device"]).manual_seed(args["seed"])
    answer = ask(model, tokenizer, template, image_args(model, train), [args["image"] or None], [prompt],
                 args["max_new_tokens"], args["temperature"], args["top_p"], generator, [region],
                 train.get("no_coor", False))[0]
    print(answer)
    if args["out_png"]:
        draw(args["image"], region, answer, args["out_png"], prompt)
        print(f"wrote {args['out_png']}")
