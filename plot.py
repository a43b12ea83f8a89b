"""
A run's curves from its out_dir/log.jsonl: train and val loss (and val loss with shuffled images, whose gap
to val loss is how much the model looks), and the accuracy per question type, against the step, with the
start of each stage marked. train.py draws them at the end of a run; any run's log, finished or not:

    python plot.py out-shapes            # writes out-shapes/curves.png
"""
import json
import os
import sys


def read_log(path):
    """log.jsonl -> {key: ([step, ...], [value, ...])}; a key logged twice at a step keeps its last value."""
    series = {}
    with open(path) as f:
        for line in filter(str.strip, f):
            entry = json.loads(line)
            for key, value in entry.items():
                if key != "step":
                    series.setdefault(key, {})[entry["step"]] = value
    return {k: (list(v), list(v.values())) for k, v in series.items()}


def plot_curves(out_dir):
    """Draw out_dir/log.jsonl into out_dir/curves.png; -> its path."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    series = read_log(os.path.join(out_dir, "log.jsonl"))
    fig, (losses, accuracy) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=80)
    names = {"train/loss": "train", "val/loss": "val", "val/loss_shuffled_images": "val, shuffled images"}
    for key, label in names.items():
        if key in series:
            losses.plot(*series[key], label=label, marker="." if key != "train/loss" else None)
    losses.set(xlabel="step", ylabel="loss", yscale="log", title="loss")
    for key in sorted(k for k in series if k.startswith("accuracy/")):
        accuracy.plot(*series[key], marker=".", label=key.split("/", 1)[1])
    accuracy.set(xlabel="step", ylabel="accuracy", ylim=(0, 1.02), title="accuracy per question type")
    starts = series["stage_starts"][1][-1] if "stage_starts" in series else [0]  # as last logged (a resume)
    for ax in (losses, accuracy):
        for start in starts[1:]:  # a dotted line where each stage after the first begins
            ax.axvline(start, color="gray", linestyle=":", linewidth=1)
        if ax.has_data():
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = os.path.join(out_dir, "curves.png")
    fig.savefig(path)
    plt.close(fig)
    return path


if __name__ == "__main__":
    print(plot_curves(sys.argv[1] if len(sys.argv) > 1 else "out-shapes"))
