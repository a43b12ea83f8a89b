"""
Export a trained model as a Hugging Face LLaVA folder, which transformers (and from there vLLM and
others) loads without glimpse:

    python export.py --out_dir=out-llava --hf_dir=llava-hf     # the newest checkpoint of out_dir
    python export.py --ckpt=out-llava/ckpt-0005000 --hf_dir=llava-hf --dtype=bfloat16
    python export.py --ckpt=out-lora/ckpt-0005000 --merged_dir=out-merged  # a plain glimpse checkpoint

    from transformers import AutoProcessor, LlavaForConditionalGeneration
    model = LlavaForConditionalGeneration.from_pretrained("llava-hf")
    processor = AutoProcessor.from_pretrained("llava-hf")

The folder holds config.json and model.safetensors (hf_llava.save_hf_llava), the tokenizer, the image
processor settings that redo data.load_image, and the run's chat template as Jinja (vicuna_v1_image_both writes
a message's one image twice: give the processor the image twice, images=[image, image]). A model that Llava
cannot represent (a conv tower, merged patches, a projector other than 'mlp2x_gelu' or 'linear', a
region sampler, ...) is refused with the reason. `init_from=<folder>` in train.py reads it back.
A LoRA checkpoint is merged first (lora.merge_lora: W + scaling * B A), so either folder is a plain model.
"""
import json
import sys

import torch

import configurator
from checkpoint import WEIGHTS, load, newest, save
from conversation import chat_template, get_template, stop_string
from hf_llava import save_hf_llava
from lora import merge_lora


def image_processor(mode, size, mean, std):
    """transformers' LLaVA image processor set to redo data.load_image. With its PIL backend it gives the
    same pixels for 'pad' (pad to a square with the mean color, then resize) and 'square_nocrop'; for
    'crop' it rounds the resized long side down where glimpse rounds it to nearest, so the crop can sit a
    pixel apart. Its torchvision backend (the default where torchvision is installed) resizes with a
    slightly different bicubic filter."""
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
    square = {"height": size, "width": size}
    resize = {"shortest_edge": size} if mode == "crop" else square
    return LlavaImageProcessorPil(do_pad=mode == "pad", size=resize, do_center_crop=mode == "crop", crop_size=square,
                                  resample=3, image_mean=list(mean), image_std=list(std))  # 3: bicubic, as load_image


def jinja_chat_template(name, tokenizer=None):
    """The chat template `name` of conversation.py as Jinja, for apply_chat_template: the same text as
    conversation.render for Hugging Face messages ({"role", "content": str or [{"type": "image"},
    {"type": "text", "text": ...}]}); add_generation_prompt ends with the assistant's cue. 'auto' is the
    tokenizer's own template."""
    t = get_template(name)
    if t["style"] == "auto":
        return tokenizer.chat_template
    q = json.dumps  # a JSON string is a Jinja string literal
    # a message's text, with an image part written as <image>
    flat = ("{%- macro flat(c) -%}{%- if c is string -%}{{ c }}{%- else -%}{%- for p in c -%}"
            "{{ '<image>' if p.type == 'image' else (p.text if p.type == 'text' else '') }}"
            "{%- endfor -%}{%- endif -%}{%- endmacro -%}")
    if t["style"] == "plain":  # the image alone, then the caption
        return flat + ("{%- for m in messages -%}{%- if m.role == 'user' -%}{{ '<image>' }}"
                       "{%- elif m.role == 'assistant' -%}{{ flat(m.content) + " + q(t["sep"]) + " }}"
                       "{%- endif -%}{%- endfor -%}")
    # LLaVA moves a message's one image to its front, joined by a newline to the rest, stripped (or to its end, or both)
    at = t.get("image_at", "first")
    moved = "[" + "'<image>', " * (at != "last") + "s.replace('<image>', '') | trim" + ", '<image>'" * (at != "first")
    user_macro = ("{%- macro user(c) -%}{%- set s = flat(c) -%}{%- if s.count('<image>') == 1 -%}"
                  "{{ " + moved + "] | select | join('\n') }}{%- else -%}{{ s }}{%- endif -%}{%- endmacro -%}")
    # each style as Jinja expressions: the text before the first turn, a user turn, an assistant turn, the
    # assistant's cue; s is the system prompt, q and a the messages, first whether q is the first question
    sep, sep2 = q(t.get("sep", "")), q(t.get("sep2", ""))
    roles = [q(r) for r in t.get("roles", ("", ""))]
    user_, assistant_ = [q(r + ": ") for r in t.get("roles", ("", ""))]
    style = {
        "two": (f"s + {sep}", f"{user_} + q + {sep}", f"{assistant_} + a + {sep2}",
                q(t.get("roles", ("", ""))[1] + ":")),
        "llama_2": ("''", f"({sep} if not first else '') + '[INST] ' + "
                          "(('<<SYS>>\n' + s + '\n<</SYS>>\n\n') if first and s else '') + q + ' [/INST]'",
                    f"' ' + a + ' ' + {sep2}", "''"),
        "mpt": (f"s + {sep}", f"{roles[0]} + q + {sep}", f"{roles[1]} + a + {sep}", roles[1]),
        "llama_3": (f"('<|start_header_id|>system<|end_header_id|>\n\n' + (s | trim) + {sep2}) if s else ''",
                    f"'<|start_header_id|>user<|end_header_id|>\n\n' + (q | trim) + {sep2}",
                    f"'<|start_header_id|>assistant<|end_header_id|>\n\n' + (a | trim) + {sep2}",
                    "'<|start_header_id|>assistant<|end_header_id|>\n\n'"),
        "chatml": ("'<|im_start|>system\n' + s + '<|im_end|>\n'", "'<|im_start|>user\n' + q + '<|im_end|>\n'",
                   f"'<|im_start|>assistant\n' + a + {sep2} + '\n'", "'<|im_start|>assistant\n'"),
        "gemma": ("''",
                  "'<start_of_turn>user\n' + ((s + '\n\n') if first and s else '') + (q | trim) + '<end_of_turn>\n'",
                  f"'<start_of_turn>model\n' + (a | trim) + {sep2} + '\n'", "'<start_of_turn>model\n'"),
    }
    before, user, assistant, cue = style[t["style"]]
    return flat + user_macro + (
        "{%- set ns = namespace(s=" + q(t["system"]) + ", first=true) -%}"
        "{%- for m in messages -%}"
        "{%- if m.role == 'system' -%}{%- set ns.s = flat(m.content) -%}"
        "{%- elif m.role == 'user' -%}{%- set s, q, first = ns.s, user(m.content), ns.first -%}"
        "{{ ((" + before + ") if first else '') + " + user + " }}{%- set ns.first = false -%}"
        "{%- else -%}{%- set a = flat(m.content) -%}{{ " + assistant + " }}{%- endif -%}"
        "{%- endfor -%}{%- if add_generation_prompt -%}{{ " + cue + " }}{%- endif -%}")


def export(ckpt, hf_dir, dtype="float32"):
    """A glimpse checkpoint folder -> a transformers LLaVA folder. Returns the LlavaConfig."""
    from transformers import AutoTokenizer, GenerationConfig, LlavaProcessor
    model, config = load(ckpt)
    merge_lora(model)  # a LoRA checkpoint becomes the plain model
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    train = config.get("train", {})
    template = chat_template(train.get("version", "vicuna_v1"))
    model.to({"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype])
    llava = save_hf_llava(model, hf_dir)  # refuses first, before anything else is written
    t = model.vision_tower
    tokenizer.chat_template = jinja_chat_template(template, tokenizer)
    pixels = image_processor(train.get("image_aspect_ratio", "pad"), t.image_size, t.image_mean, t.image_std)
    processor = LlavaProcessor(pixels, tokenizer, patch_size=t.encoder.config.patch_size,
                               chat_template=tokenizer.chat_template,
                               vision_feature_select_strategy=llava.vision_feature_select_strategy,
                               num_additional_image_tokens=t.num_prefix, image_token="<image>")
    processor.save_pretrained(hf_dir)
    processor.image_processor.save_pretrained(hf_dir)  # also alone (preprocessor_config.json), for older loaders
    # generate() stops at EOS and at the template's stop string when that is a single token
    stop = tokenizer(stop_string(template, tokenizer), add_special_tokens=False)["input_ids"]
    eos = sorted(i for i in {tokenizer.eos_token_id, *(stop if len(stop) == 1 else [])} if i is not None)
    generation = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=eos,
                                  pad_token_id=tokenizer.pad_token_id)
    generation.save_pretrained(hf_dir)
    return llava


def export_merged(ckpt, out):
    """A LoRA checkpoint -> a plain glimpse checkpoint folder (config, weights, tokenizer) with the adapters
    merged in: it loads without its base, for any architecture (the shapes default's conv tower too)."""
    from transformers import AutoTokenizer
    model, config = load(ckpt)
    merge_lora(model)
    save(model, out, {k: v for k, v in config.items() if k not in ("model", "lora")})
    AutoTokenizer.from_pretrained(ckpt).save_pretrained(out)


if __name__ == "__main__":
    args = configurator.configure(dict(out_dir="out-shapes", ckpt="", hf_dir="", merged_dir="", dtype="float32"),
                                  sys.argv[1:])
    ckpt = args["ckpt"] or newest(args["out_dir"], names=WEIGHTS)
    if ckpt is None or not (args["hf_dir"] or args["merged_dir"]):
        sys.exit(f"usage: python export.py --out_dir=<a run's out_dir> --hf_dir=<new folder> (or --merged_dir=<new "
                 f"folder>: a plain glimpse checkpoint) (no checkpoint in {args['out_dir']}?)")
    if args["merged_dir"]:
        export_merged(ckpt, args["merged_dir"])
        print(f"wrote {args['merged_dir']}: a glimpse checkpoint with the LoRA adapters merged into the weights")
    if args["hf_dir"]:
        try:
            export(ckpt, args["hf_dir"], args["dtype"])
        except ValueError as e:
            sys.exit(f"{ckpt}: {e}")
        print(f"wrote {args['hf_dir']}: LlavaForConditionalGeneration.from_pretrained and "
              "AutoProcessor.from_pretrained load it")
