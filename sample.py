"""
Ask a trained model about an image.

    python sample.py --out_dir=out-shapes --image=path.png --prompt="What color is the circle?"

Loads the newest checkpoint in out_dir (or --ckpt=<checkpoint folder>) with its tokenizer, chat
template and image settings. temperature=0 decodes greedily.
"""
import sys

import torch

import configurator
from conversation import chat_template, stop_string, tokenize
from data import load_image
from model import checkpoints, load
from transformers import AutoTokenizer


def ask(model, tokenizer, template, image_args, images, questions, max_new_tokens=64, temperature=0.0, top_p=0.9,
        generator=None):
    """One answer per (image path or None, question), generated as one left-padded batch."""
    device = next(model.parameters()).device
    prompts = [tokenize(template, [{"from": "human", "value": ("<image>\n" if img else "") + q}], tokenizer,
                        model.num_image_tokens)[0] for img, q in zip(images, questions)]
    T = max(map(len, prompts))
    input_ids = torch.full((len(prompts), T), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, p in enumerate(prompts):
        input_ids[i, T - len(p):], attention_mask[i, T - len(p):] = torch.tensor(p), 1
    pixels = [load_image(img, *image_args) for img in images if img]
    pixel_values = torch.stack(pixels).to(device) if pixels else None
    stop = stop_string(template, tokenizer)
    new = model.generate(input_ids.to(device), attention_mask.to(device), pixel_values, max_new_tokens, temperature,
                         top_p, {tokenizer.eos_token_id}, generator, stop=ends_with_text(tokenizer, stop))
    texts = tokenizer.batch_decode(new.tolist(), skip_special_tokens=True)
    return [t.split(stop)[0].strip() for t in texts]


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


if __name__ == "__main__":
    args = configurator.configure(dict(out_dir="out-shapes", ckpt="", image="", prompt="Describe the image.",
                                       max_new_tokens=64, temperature=0.0, top_p=0.9, seed=1337, device="cpu"), sys.argv[1:])
    ckpt = args["ckpt"] or (checkpoints(args["out_dir"]) or [None])[-1]
    if ckpt is None:
        sys.exit(f"no checkpoint in {args['out_dir']}: train one first (python train.py)")
    model, config = load(ckpt, args["device"])
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    train = config.get("train", {})  # a Hugging Face LLaVA folder has no run config: its own chat template
    template = chat_template(train["version"]) if "version" in train else "auto" if tokenizer.chat_template else "vicuna_v1"
    answer = ask(model, tokenizer, template, image_args(model, train), [args["image"] or None], [args["prompt"]],
                 args["max_new_tokens"], args["temperature"], args["top_p"], torch.Generator(args["device"]).manual_seed(args["seed"]))
    print(answer[0])
