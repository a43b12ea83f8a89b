"""
nanoGPT-style configuration: `python train.py config/x.py --key=value ...`

A config file is Python, executed on purpose (it is the user's own code); a --key=value override is
parsed with ast.literal_eval and falls back to a plain string, so strings need no quotes. Unlike
nanoGPT, a key that the script does not have is an error that names the closest known key, a None
default can be overridden, and an int is accepted where the default is a float.
"""
import ast
import difflib


def check_key(key, config, where):
    if key not in config:
        close = difflib.get_close_matches(key, list(config), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise KeyError(f"{where}: unknown config key {key!r}{hint}")


def cast(key, value, default, where):
    """Check a value against the type of its default; int -> float is fine, a None default takes anything,
    a path (str) and a config (dict) stand in for each other (model_name_or_path, vision_tower), and a
    number or a list stands in for a comma-separated string (data_multiple=0.5, data_path=[a, b])."""
    if default is None or value is None or type(value) is type(default):
        return value
    if isinstance(default, float) and type(value) is int:
        return float(value)
    if {type(value), type(default)} == {str, dict} or {type(value), type(default)} == {list, tuple}:
        return value
    if isinstance(default, str) and isinstance(value, (int, float, list, tuple)) and not isinstance(value, bool):
        return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)  # 'a,b': one per data file
    raise TypeError(f"{where}: {key}={value!r} is a {type(value).__name__}, "
                    f"but the default {default!r} is a {type(default).__name__}")


def configure(config, argv):
    """Apply config files and --key=value overrides from argv to the dict `config`; returns it."""
    for arg in argv:
        if not arg.startswith("--"):
            namespace = {}
            with open(arg) as f:
                exec(f.read(), namespace)
            for key, value in namespace.items():
                if key.startswith("_") or type(value).__name__ == "module":
                    continue
                check_key(key, config, arg)
                config[key] = cast(key, value, config[key], arg)
            continue
        key, sep, text = arg[2:].partition("=")
        if not sep:
            raise ValueError(f"{arg}: overrides are written --key=value")
        check_key(key, config, arg)
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        if isinstance(config[key], str) and not isinstance(value, (str, dict)):
            value = text  # --out_dir=123 stays a string
        config[key] = cast(key, value, config[key], arg)
    return config
