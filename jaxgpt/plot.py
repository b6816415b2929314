"""`python -m jaxgpt.plot WORKDIR [--out=FILE]`: the loss curves of a run (metrics.jsonl) as a PNG."""
from __future__ import annotations

import json
import os

from absl import flags

from jaxgpt.errors import UserFileNotFoundError, UserValueError

flags.DEFINE_string("out", None, "PNG to write; default WORKDIR/loss.png.")


def read_metrics(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise UserFileNotFoundError(f"{path} does not exist: is {workdir} a jaxgpt training workdir?")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot(workdir: str, out: str | None = None) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(workdir)
    fig, ax = plt.subplots(figsize=(8, 5))
    for key, style in (("loss", "-"), ("val_loss", "o-")):
        points = sorted((r["step"], r[key]) for r in rows if key in r)
        if points:
            ax.plot(*zip(*points), style, label=key.replace("_", " "), markersize=3)
    ax.set(xlabel="step", ylabel="loss", title=os.path.basename(os.path.abspath(workdir)))
    ax.grid(alpha=0.3)
    ax.legend()
    out = out or os.path.join(workdir, "loss.png")
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return out


def main(argv):
    if len(argv) != 2:
        raise UserValueError("usage: python -m jaxgpt.plot WORKDIR [--out=FILE]")
    print(plot(argv[1], flags.FLAGS.out))


if __name__ == "__main__":
    from jaxgpt import cli
    cli.run(main)
