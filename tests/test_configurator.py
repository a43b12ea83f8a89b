"""configurator.py: config files, then --key=value overrides, checked against the defaults' types."""
import pytest
from conftest import REPO

from configurator import configure


def defaults():
    return dict(out_dir="out", learning_rate=1e-3, max_iters=100, compile=False, mm_projector_lr=None,
                vision_tower=dict(model_type="clip_vision_model"), betas=(0.9, 0.95))


def test_config_file_is_executed(tmp_path):
    f = tmp_path / "stage.py"
    f.write_text("import math\n_helper = 3\nmax_iters = 2 * 7\nlearning_rate = math.sqrt(4) * 1e-4\n"
                 "out_dir = 'out-' + str(_helper)\n")
    c = configure(defaults(), [str(f)])
    assert c["max_iters"] == 14
    assert c["learning_rate"] == pytest.approx(2e-4)
    assert c["out_dir"] == "out-3"
    assert "_helper" not in c and "math" not in c


def test_config_file_then_overrides_in_order(tmp_path):
    f = tmp_path / "a.py"
    f.write_text("max_iters = 5\nout_dir = 'from-file'\n")
    c = configure(defaults(), [str(f), "--max_iters=9"])
    assert (c["max_iters"], c["out_dir"]) == (9, "from-file")
    c = configure(defaults(), ["--max_iters=9", str(f)])
    assert c["max_iters"] == 5


def test_unknown_key_in_config_file_names_file_and_closest_key(tmp_path):
    f = tmp_path / "bad.py"
    f.write_text("max_iter = 5\n")
    with pytest.raises(KeyError) as e:
        configure(defaults(), [str(f)])
    assert str(f) in str(e.value) and "'max_iters'" in str(e.value)


@pytest.mark.parametrize("arg, key, value", [
    ("--max_iters=7", "max_iters", 7),
    ("--learning_rate=3e-4", "learning_rate", 3e-4),
    ("--compile=True", "compile", True),
    ("--out_dir=runs/a b", "out_dir", "runs/a b"),  # not a literal: the plain string
    ("--out_dir='quoted'", "out_dir", "quoted"),
    ("--out_dir=", "out_dir", ""),
    ("--vision_tower={'model_type': 'siglip_vision_model', 'image_size': 32}", "vision_tower",
     {"model_type": "siglip_vision_model", "image_size": 32}),
    ("--betas=(0.8, 0.9)", "betas", (0.8, 0.9)),
])
def test_override_literal_parsing(arg, key, value):
    c = configure(defaults(), [arg])
    assert c[key] == value and type(c[key]) is type(value)


def test_unknown_key_names_the_closest_key():
    with pytest.raises(KeyError) as e:
        configure(defaults(), ["--learning_rat=0.1"])
    assert "'learning_rat'" in str(e.value) and "'learning_rate'" in str(e.value)


def test_unknown_key_without_close_match():
    with pytest.raises(KeyError, match="zzzz"):
        configure(defaults(), ["--zzzz=1"])


def test_override_without_value_is_an_error():
    with pytest.raises(ValueError, match="--key=value"):
        configure(defaults(), ["--max_iters"])


def test_none_default_takes_any_value():
    assert configure(defaults(), ["--mm_projector_lr=2e-5"])["mm_projector_lr"] == 2e-5
    assert configure(defaults(), ["--mm_projector_lr=abc"])["mm_projector_lr"] == "abc"


def test_value_can_be_set_back_to_none():
    assert configure(defaults(), ["--learning_rate=None"])["learning_rate"] is None


def test_int_is_accepted_for_a_float_default():
    c = configure(defaults(), ["--learning_rate=1"])
    assert c["learning_rate"] == 1.0 and type(c["learning_rate"]) is float


@pytest.mark.parametrize("arg", ["--max_iters=1.5", "--max_iters=abc", "--learning_rate=fast", "--compile=1",
                                 "--max_iters=True", "--vision_tower=[1, 2]"])
def test_type_mismatch_is_an_error(arg):
    with pytest.raises(TypeError) as e:
        configure(defaults(), [arg])
    assert arg[2:].split("=")[0] in str(e.value)


def test_str_default_keeps_digits_as_a_string():
    c = configure(defaults(), ["--out_dir=123"])
    assert c["out_dir"] == "123" and type(c["out_dir"]) is str
    assert configure(defaults(), ["--out_dir=1e-3"])["out_dir"] == "1e-3"  # not 0.001


def test_numbers_and_lists_stand_in_for_a_comma_separated_string(tmp_path):
    # per-file settings (data_path, data_multiple) are comma-separated strings; a config file may write a number
    # or a list
    config = tmp_path / "c.py"
    config.write_text("data_multiple = 0.5\ndata_path = ['a.json', 'b.json']\n")
    c = configure(dict(data_multiple="1", data_path="x.json"), [str(config)])
    assert c == {"data_multiple": "0.5", "data_path": "a.json,b.json"}
    assert configure(dict(data_multiple="1"), ["--data_multiple=3,1,0.2"])["data_multiple"] == "3,1,0.2"


def test_path_and_config_dict_stand_in_for_each_other():
    assert configure(defaults(), ["--vision_tower=openai/clip-vit-large-patch14"])["vision_tower"] == \
        "openai/clip-vit-large-patch14"
    c = configure(dict(model="path"), ["--model={'model_type': 'llama'}"])
    assert c["model"] == {"model_type": "llama"}


def train_defaults():
    """train.py's settings: its globals above `config_keys`, as it defines them (the block reads torch.cuda),
    and model.VLMConfig's fields but those the tokenizer gives."""
    from dataclasses import asdict

    from model import TOKENIZER_FIELDS, VLMConfig
    src = (REPO / "train.py").read_text()
    defaults = {}
    exec("import torch\n" + src[src.index("# I/O"):src.index("config_keys =")], defaults)
    model = {k: v for k, v in asdict(VLMConfig()).items() if k not in TOKENIZER_FIELDS}
    return {**model, **{k: v for k, v in defaults.items() if not k.startswith("__") and k != "torch"}}


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "config").glob("*.py")))
def test_every_config_file_sets_only_train_settings(name):
    # a key train.py does not have would stop the run at its start, on a GPU node: catch it here
    configure(train_defaults(), [str(REPO / "config" / name)])


def test_train_shapes_config_restates_the_defaults():
    """config/train_shapes.py says it holds train.py's defaults: keep the two equal."""
    defaults = train_defaults()
    config = {}
    exec((REPO / "config" / "train_shapes.py").read_text(), config)
    restated = {k: v for k, v in config.items() if not k.startswith("__")}
    assert len(restated) > 10
    for key, value in restated.items():
        assert key in defaults, key
        if key != "dtype":  # the default picks bfloat16 on a GPU
            assert defaults[key] == value, key
    assert defaults["dtype"] == "float32"  # on this CPU-only test machine
