"""python -m torch_bridge import --from hf:DIR|nanogpt:FILE --out MODEL_DIR
   python -m torch_bridge export --ckpt MODEL_DIR --to hf:DIR|nanogpt:FILE

MODEL_DIR is a jaxgpt model directory (jaxgpt.checkpoint.save_model) or a training workdir; export's --ckpt also
takes any weights spec of jaxgpt.loader (hf:DIR, nanogpt:FILE).
"""
from __future__ import annotations

import argparse

from jaxgpt import cli, loader
from jaxgpt.checkpoint import save_model
from jaxgpt.errors import UserError
from torch_bridge import from_hf, from_nanogpt, save_hf, to_nanogpt

IMPORTERS = {"hf": from_hf, "nanogpt": from_nanogpt}
EXPORTERS = {"hf": save_hf, "nanogpt": to_nanogpt}


def parse_spec(spec: str) -> tuple[str, str]:
    fmt, _, path = spec.partition(":")
    if fmt not in IMPORTERS or not path:
        raise argparse.ArgumentTypeError(f"{spec!r}: expected hf:DIR or nanogpt:FILE")
    return fmt, path


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, as every jaxgpt CLI (argparse would print the usage first)
        cli.fail(f"{message} (python -m torch_bridge {{import,export}} --help)")


def main(argv=None) -> None:
    parser = Parser(prog="python -m torch_bridge", description=__doc__.split("\n\n")[1])
    commands = parser.add_subparsers(dest="command", required=True)
    imp = commands.add_parser("import", help="PyTorch GPT-2 checkpoint -> jaxgpt model directory")
    imp.add_argument("--from", dest="source", type=parse_spec, required=True, metavar="hf:DIR|nanogpt:FILE")
    imp.add_argument("--out", required=True, metavar="MODEL_DIR")
    imp.add_argument("--n-head", type=int, help="for bare state dicts whose n_embd matches no GPT-2 preset")
    exp = commands.add_parser("export", help="jaxgpt model directory -> PyTorch GPT-2 checkpoint")
    exp.add_argument("--ckpt", required=True, metavar="MODEL_DIR")
    exp.add_argument("--step", default="latest", help="a training workdir's checkpoint: latest, best or N")
    exp.add_argument("--to", type=parse_spec, required=True, metavar="hf:DIR|nanogpt:FILE")
    args = parser.parse_args(argv)
    try:
        if args.command == "import":
            fmt, path = args.source
            written = save_model(IMPORTERS[fmt](path, n_head=args.n_head), args.out)
        else:
            fmt, path = args.to
            written = EXPORTERS[fmt](loader.load(args.ckpt, args.step), path)
    except (UserError, OSError) as e:
        cli.fail(e)
    print(f"wrote {written}")


if __name__ == "__main__":
    main()
