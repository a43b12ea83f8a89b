"""export.py and hf_llava.from_hf_llava: a glimpse checkpoint becomes a folder that transformers'
LlavaForConditionalGeneration and AutoProcessor load and that gives the same logits (from the same chat,
image and weights), and such a folder comes back into glimpse, also as train.py's init_from. What Llava
cannot represent is refused."""
import json
import sys

import numpy as np
import pytest
import torch
from conftest import TINY_LLM, TINY_TOWER, run_script
from PIL import Image
from test_model import LLMS, TOWERS, make_model
from transformers import AutoProcessor, LlavaForConditionalGeneration

from checkpoint import load, save
from conversation import TEMPLATES, render, tokenize
from data import load_image
from export import export, image_processor, jinja_chat_template
from hf_llava import hf_llava_config

CHAT = [{"from": "human", "value": "What color is the circle?\n<image>"}, {"from": "gpt", "value": "It is red."},
        {"from": "human", "value": "And the square?"}, {"from": "gpt", "value": "Blue."}]


def hf_messages(chat, image_as_part=True):
    """LLaVA messages -> Hugging Face chat messages; the image as a content part or as <image> in the text."""
    out = []
    for m in chat:
        role = {"human": "user", "gpt": "assistant", "system": "system"}[m["from"]]
        if image_as_part and "<image>" in m["value"]:
            content = [{"type": "image"}, {"type": "text", "text": m["value"].replace("<image>", "").strip()}]
        else:
            content = m["value"]
        out.append({"role": role, "content": content})
    return out


def checkpoint(tokenizer, path, seed=0, version="vicuna_v1", image_aspect_ratio="pad", **overrides):
    """A glimpse checkpoint folder (config, weights, tokenizer) of a tiny random model."""
    model = make_model(tokenizer, seed=seed, **overrides)
    save(model, path, {"train": {"version": version, "image_aspect_ratio": image_aspect_ratio}})
    tokenizer.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """A non-square noise image, so that padding, resizing and normalization all show."""
    path = tmp_path_factory.mktemp("img") / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 41, 3), dtype=np.uint8)).save(path)
    return path


@torch.no_grad()
def glimpse_logits(model, ids, pixel_values):
    return model.llm(inputs_embeds=model.embed(torch.tensor([ids]), pixel_values[None])).logits


# tower, feature selection, LLM, projector: every tower and LLM family at least once
CASES = [("clip", "patch", "llama", "mlp2x_gelu"), ("clip", "cls_patch", "qwen2", "linear"),
         ("siglip", "patch", "mistral", "mlp2x_gelu"), ("dinov2", "cls_patch", "gemma", "mlp2x_gelu"),
         ("vit", "patch", "gpt2", "mlp2x_gelu"), ("siglip", "cls_patch", "opt", "linear")]


@pytest.mark.parametrize("tower, feature, llm, projector", CASES)
def test_export_gives_transformers_llava_with_the_same_logits(tokenizer, image, tmp_path, tower, feature, llm,
                                                              projector):
    model = checkpoint(tokenizer, tmp_path / "ckpt", seed=1, vision_tower=TOWERS[tower][0],
                       mm_vision_select_feature=feature, model_name_or_path={**LLMS[llm], "initializer_range": 0.2},
                       mm_projector_type=projector, mm_vision_select_layer=-2)
    if (tower, llm) == ("clip", "llama"):  # the command line, once
        run_script([sys.executable, "export.py", f"--ckpt={tmp_path / 'ckpt'}", f"--hf_dir={tmp_path / 'hf'}"])
    else:
        export(tmp_path / "ckpt", tmp_path / "hf")
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "hf", backend="pil")
    assert not list((tmp_path / "hf").glob("*.bin")) and not list((tmp_path / "hf").glob("*.pt"))  # safetensors only
    assert hf.config.image_seq_length == model.num_image_tokens

    # the same chat, image and weights through transformers' processor and model, and through glimpse
    text = processor.apply_chat_template(hf_messages(CHAT), tokenize=False)
    assert text == render("vicuna_v1", CHAT)
    inputs = processor(images=Image.open(image), text=text, return_tensors="pt")
    ids, _ = tokenize("vicuna_v1", CHAT, tokenizer, model.num_image_tokens)
    assert inputs["input_ids"][0].tolist() == ids
    t = model.vision_tower
    pixels = load_image(str(image), "pad", t.image_size, t.image_mean, t.image_std)
    torch.testing.assert_close(inputs["pixel_values"][0], pixels, rtol=0, atol=1e-6)
    with torch.no_grad():
        theirs = hf(**inputs).logits
    ours = glimpse_logits(model, ids, pixels)
    assert (theirs - ours).abs().max() <= 1e-4

    # and back: the folder loads as a glimpse model (as train.py's init_from) with the same logits
    back, config = load(tmp_path / "hf")
    assert back.num_image_tokens == model.num_image_tokens
    assert back.config.mm_vision_select_feature == (feature if t.num_prefix else "patch")  # SigLIP: the same
    assert (back.vision_tower.image_mean, back.vision_tower.image_std) == (t.image_mean, t.image_std)
    assert (glimpse_logits(back.eval(), ids, pixels) - ours).abs().max() <= 1e-4
    tied = lambda m: m.llm.get_input_embeddings().weight is m.llm.get_output_embeddings().weight  # noqa: E731
    # tied stays tied, except where Llava cannot tie (GPT-2 and OPT name their embeddings otherwise)
    assert tied(back) == (tied(model) and llm not in ("gpt2", "opt"))


def test_an_image_its_template_shows_twice_is_given_to_the_processor_twice(tokenizer, image, tmp_path):
    """vicuna_v1_image_both's Jinja writes the message's one <image> before and after the question; transformers'
    processor, given the image twice, then makes glimpse's ids and logits."""
    model = checkpoint(tokenizer, tmp_path / "ckpt", seed=1, version="vicuna_v1_image_both",
                       vision_tower=TOWERS["clip"][0], model_name_or_path={**LLMS["llama"], "initializer_range": 0.2},
                       mm_vision_select_layer=-2)
    export(tmp_path / "ckpt", tmp_path / "hf")
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "hf", backend="pil")
    text = processor.apply_chat_template(hf_messages(CHAT), tokenize=False)
    assert text == render("vicuna_v1_image_both", CHAT) and text.count("<image>") == 2
    inputs = processor(images=[Image.open(image)] * 2, text=text, return_tensors="pt")
    ids, _ = tokenize("vicuna_v1_image_both", CHAT, tokenizer, model.num_image_tokens)
    assert inputs["input_ids"][0].tolist() == ids
    t = model.vision_tower
    pixels = load_image(str(image), "pad", t.image_size, t.image_mean, t.image_std)
    with torch.no_grad():
        theirs = hf(**inputs).logits
        ours = model.llm(inputs_embeds=model.embed(torch.tensor([ids]), torch.stack([pixels, pixels]))).logits
    assert (theirs - ours).abs().max() <= 1e-4


@pytest.mark.parametrize("overrides, message", [
    (dict(vision_tower=dict(model_type="convnext", image_size=32, patch_size=4, num_stages=2, hidden_sizes=[8, 16],
                            depths=[1, 1])), "conv net"),
    (dict(vision_tower=TOWERS["dinov2_registers"][0]), "register tokens"),
    (dict(mm_patch_merge=2), "mm_patch_merge=2"),
    (dict(mm_projector_type="mlp3x_gelu"), "mlp3x_gelu"),
    (dict(mm_projector_type="identity"), "identity"),
    (dict(model_name_or_path=LLMS["gemma2"]), "final_logit_softcapping"),
    (dict(add_region_feature=True), "region sampler"),
])
def test_export_refuses_what_llava_cannot_represent(tokenizer, tmp_path, overrides, message):
    model = checkpoint(tokenizer, tmp_path / "ckpt", **overrides)
    with pytest.raises(ValueError, match=message):
        hf_llava_config(model)
    with pytest.raises(ValueError, match="cannot export"):
        export(tmp_path / "ckpt", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()  # refused before anything is written


def test_export_command_says_why_it_refuses(tokenizer, tmp_path):
    checkpoint(tokenizer, tmp_path / "ckpt", mm_projector_type="mlp3x_gelu")
    proc = run_script([sys.executable, "export.py", f"--ckpt={tmp_path / 'ckpt'}", f"--hf_dir={tmp_path / 'hf'}"],
                      check=False)
    assert proc.returncode != 0 and "mm_projector_type='mlp3x_gelu'" in proc.stderr
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("mode", ["pad", "square_nocrop", "crop"])
@pytest.mark.parametrize("size", [(41, 28), (20, 33), (48, 48)])
def test_image_processor_reproduces_load_image(tmp_path, mode, size):
    """'pad' and 'square_nocrop' give glimpse's pixels for any image; 'crop' for a square one (for others
    transformers rounds the resized long side down, glimpse to nearest)."""
    path = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    theirs = image_processor(mode, 32, mean, std)(Image.open(path), return_tensors="pt")["pixel_values"][0]
    ours = load_image(str(path), mode, 32, mean, std)
    if mode != "crop" or size[0] == size[1]:
        torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-6)
    else:
        assert theirs.shape == ours.shape


CONVERSATIONS = [
    [{"from": "human", "value": "<image>\nDescribe it."}, {"from": "gpt", "value": "A red circle."}],
    CHAT,
    CHAT[:3],  # ends with the human: the generation prompt
    [{"from": "system", "value": "Be brief."}] + CHAT,
    [{"from": "human", "value": "How many shapes?"}, {"from": "gpt", "value": "Two."}],  # no image
    [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "A red circle."}],  # the image alone
]


@pytest.mark.parametrize("name", [n for n, t in TEMPLATES.items() if t["style"] != "auto"])
@pytest.mark.parametrize("image_as_part", [True, False])
def test_jinja_chat_template_renders_like_conversation(tokenizer, name, image_as_part):
    jinja = jinja_chat_template(name, tokenizer)
    convs = CONVERSATIONS if TEMPLATES[name]["style"] != "plain" else [CONVERSATIONS[0], CONVERSATIONS[0][:1]]
    for chat in convs:
        prompt = chat[-1]["from"] == "human"
        text = tokenizer.apply_chat_template(hf_messages(chat, image_as_part), chat_template=jinja, tokenize=False,
                                             add_generation_prompt=prompt)
        assert text == render(name, chat), (name, chat)


def test_train_continues_from_an_exported_folder(shapes, tokenizer, train, tmp_path):
    """init_from=<Hugging Face LLaVA folder> trains from its weights: the first step's loss is the one
    of the glimpse checkpoint it was exported from."""
    checkpoint(tokenizer, tmp_path / "ckpt", seed=2, vision_tower=TINY_TOWER, model_name_or_path=TINY_LLM,
               mm_vision_select_layer=-2)
    export(tmp_path / "ckpt", tmp_path / "hf")
    runs = [train(tmp_path / name, init_from=tmp_path / src, max_iters=1, eval_data_path="")
            for name, src in (("from-ckpt", "ckpt"), ("from-hf", "hf"))]
    assert f"loading {tmp_path / 'hf'}" in runs[1].stdout
    assert runs[0].steps[1]["loss"] == pytest.approx(runs[1].steps[1]["loss"], abs=1e-4)
    assert (json.loads((tmp_path / "from-hf" / "ckpt-0000001" / "config.json").read_text())["model"]["image_token_id"]
            == tokenizer.convert_tokens_to_ids("<image>"))
