"""python -m torch_bridge import --from hf:DIR|nanogpt:FILE|openai:DIR --out MODEL_DIR
   python -m torch_bridge export --ckpt MODEL_DIR --to hf:DIR|nanogpt:FILE [--tokenizer gpt2|DATA_DIR]

An hf: directory holds GPT-2 or Llama (config.json's model_type says which); an openai: directory is a model of
OpenAI's GPT-2 release (hparams.json, a TensorFlow checkpoint, encoder.json and vocab.bpe); an hf: export writes
whichever expresses the model. It is complete (weights, tokenizer, generation config): transformers.pipeline loads
it offline. MODEL_DIR is a jaxgpt model directory (jaxgpt.checkpoint.save_model) or a training workdir; export's
--ckpt also takes any weights spec of jaxgpt.loader (hf:DIR, nanogpt:FILE, openai:DIR).
"""
from __future__ import annotations

import argparse

from jaxgpt import cli, loader, tokenizer
from jaxgpt.checkpoint import save_model
from jaxgpt.errors import UserError, UserValueError
from torch_bridge import from_hf, from_nanogpt, from_openai, save_hf, to_nanogpt

IMPORTERS = {"hf": from_hf, "nanogpt": from_nanogpt, "openai": from_openai}
EXPORTS = ("hf", "nanogpt")


def parse_spec(spec: str, kinds=tuple(IMPORTERS)) -> tuple[str, str]:
    fmt, _, path = spec.partition(":")
    if fmt not in kinds or not path:
        forms = [loader.SPECS[k] for k in kinds]
        raise argparse.ArgumentTypeError(f"{spec!r}: expected {', '.join(forms[:-1])} or {forms[-1]}")
    return fmt, path


def parse_export_spec(spec: str) -> tuple[str, str]:
    return parse_spec(spec, EXPORTS)


def export_tokenizer(name: str | None, ckpt: str, model) -> tokenizer.Tokenizer:
    """--tokenizer, else the one saved with the checkpoint, else GPT-2 BPE when the vocabulary is GPT-2's."""
    if name:
        return tokenizer.get_tokenizer("gpt2") if name == "gpt2" else tokenizer.load_tokenizer(name)
    if (tok := tokenizer.stored_with(ckpt)) is not None:
        return tok
    if model.config.n_valid_vocab >= tokenizer.GPT2_VOCAB_SIZE:
        return tokenizer.get_tokenizer("gpt2")
    raise UserValueError(f"{ckpt} has no tokenizer saved with it and its {model.config.n_valid_vocab} tokens are "
                         "not GPT-2's: pass --tokenizer=DATA_DIR (the data it was trained on)")


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, as every jaxgpt CLI (argparse would print the usage first)
        cli.fail(f"{message} (python -m torch_bridge {{import,export}} --help)")


def main(argv=None) -> None:
    parser = Parser(prog="python -m torch_bridge", description=__doc__.split("\n\n")[1])
    commands = parser.add_subparsers(dest="command", required=True)
    imp = commands.add_parser("import", help="PyTorch GPT-2 or Llama checkpoint, or OpenAI's GPT-2 release -> jaxgpt "
                              "model directory")
    imp.add_argument("--from", dest="source", type=parse_spec, required=True, metavar="hf:DIR|nanogpt:FILE|openai:DIR")
    imp.add_argument("--out", required=True, metavar="MODEL_DIR")
    imp.add_argument("--n-head", type=int, help="for bare state dicts: Llama, or GPT-2 whose n_embd matches no preset")
    exp = commands.add_parser("export", help="jaxgpt model directory -> PyTorch checkpoint")
    exp.add_argument("--ckpt", required=True, metavar="MODEL_DIR")
    exp.add_argument("--step", default="latest", help="a training workdir's checkpoint: latest, best or N")
    exp.add_argument("--to", type=parse_export_spec, required=True, metavar="hf:DIR|nanogpt:FILE")
    exp.add_argument("--tokenizer", help="hf: 'gpt2' or a data directory; default: the one saved with --ckpt, "
                     "else GPT-2 BPE for a GPT-2-sized vocabulary")
    args = parser.parse_args(argv)
    try:
        if args.command == "import":
            fmt, path = args.source
            if fmt == "openai" and args.n_head is not None:
                raise UserValueError("--n-head is for bare state dicts; an openai: directory's hparams.json has it")
            overrides = {} if fmt == "openai" else dict(n_head=args.n_head)
            written = save_model(IMPORTERS[fmt](path, **overrides), args.out,
                                 tokenizer.stored_with(f"{fmt}:{path}") if fmt != "nanogpt" else None)
        else:
            fmt, path = args.to
            model = loader.load(args.ckpt, args.step)
            if fmt == "hf":
                written = save_hf(model, path, export_tokenizer(args.tokenizer, args.ckpt, model))
            else:
                written = to_nanogpt(model, path)
    except (UserError, OSError) as e:
        cli.fail(e)
    print(f"wrote {written}")


if __name__ == "__main__":
    main()
