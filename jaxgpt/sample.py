"""Sample text from a model, streamed to the terminal as it is produced.

    python -m jaxgpt.sample --ckpt=out/model --prompt="Hello, I'm a language model," --num_samples=3
    python -m jaxgpt.sample --hf=path/to/hf_gpt2_dir --prompt=FILE:prompt.txt --top_p=0.9
    python -m jaxgpt.sample --ckpt=out/shakespeare --interactive  # the workdir's own tokenizer
"""
from __future__ import annotations

import os
import sys

from absl import flags, logging

from jaxgpt import cli, generate, loader, tokenizer
from jaxgpt.errors import UserFileNotFoundError, UserValueError
from jaxgpt.model import GPT


def load_model(ckpt: str | None, hf: str | None, step: str = "latest") -> GPT:
    """The model of --ckpt (jaxgpt directory, at --step) or --hf (Hugging Face directory): exactly one."""
    if bool(ckpt) == bool(hf):
        raise UserValueError("give exactly one of --ckpt=DIR (jaxgpt model or workdir) or --hf=DIR (Hugging Face)")
    return loader.load(f"hf:{hf}" if hf else f"ckpt:{ckpt}", step)


def load_tokenizer(name: str, model: GPT, weights: str | None = None) -> tokenizer.Tokenizer:
    """'gpt2', a data directory, or "" for the tokenizer saved with the weights (else GPT-2 BPE); checked to fit
    the model's vocabulary."""
    if name:
        tok = tokenizer.get_tokenizer("gpt2") if name == "gpt2" else tokenizer.load_tokenizer(name)
    else:
        tok = (weights and tokenizer.stored_with(weights)) or tokenizer.get_tokenizer("gpt2")
    if tok.vocab_size > model.config.n_valid_vocab:
        raise UserValueError(f"the {tok.name} tokenizer has {tok.vocab_size} tokens but the model only "
                             f"{model.config.n_valid_vocab}: pass the --tokenizer the model was trained with")
    return tok


def read_prompt(prompt: str) -> str:
    """The prompt text; FILE:path reads it from a file (like nanoGPT)."""
    if not prompt.startswith("FILE:"):
        return prompt
    path = prompt[len("FILE:"):]
    if not os.path.isfile(path):
        raise UserFileNotFoundError(f"--prompt={prompt}: no such file {path!r}")
    with open(path, encoding="utf-8") as f:
        return f.read()


def encode_prompt(tok: tokenizer.Tokenizer, text: str) -> list[int]:
    if text:
        return tok.encode(text)
    return [tok.eot] if tok.eot is not None else tok.encode("\n")


class TextStream:
    """Decodes tokens as they arrive and writes the new text; holds back an incomplete UTF-8 character."""

    def __init__(self, tok: tokenizer.Tokenizer, out=None):
        self.tok, self.out, self.tokens, self.written = tok, out or sys.stdout, [], 0  # sys.stdout now, not at import

    def __call__(self, row: int, token: int) -> None:
        self.tokens.append(token)
        text = self.tok.decode(self.tokens)
        if text.endswith("\ufffd"):  # a multi-byte character split across tokens: wait for the rest
            return
        self.out.write(text[self.written:])
        self.out.flush()
        self.written = len(text)


def sample(model: GPT, tok: tokenizer.Tokenizer, text: str, *, num_samples: int, seed: int, **sampling) -> None:
    """Writes `num_samples` continuations of `text` to stdout, one after another, each as it is generated."""
    prompt = encode_prompt(tok, text)
    for i in range(num_samples):
        sys.stdout.write(text)
        stream = TextStream(tok)
        generate.generate(model, [prompt], seed=seed + i, eot_id=tok.eot, on_token=stream, **sampling)
        sys.stdout.write("\n" + "-" * 40 + "\n")
        sys.stdout.flush()


def main(argv):
    if len(argv) > 1:
        raise UserValueError(f"unexpected arguments {argv[1:]}")
    f = flags.FLAGS
    logging.set_verbosity(logging.WARNING)  # keep the terminal for the text (orbax logs every restore)
    model = load_model(f.ckpt, f.hf, f.step)
    tok = load_tokenizer(f.tokenizer, model, f.ckpt or f.hf)
    settings = dict(num_samples=f.num_samples, seed=f.seed, max_new_tokens=f.max_new_tokens,
                    temperature=f.temperature, top_k=f.top_k or None, top_p=f.top_p)
    if not f.interactive:
        sample(model, tok, read_prompt(f.prompt), **settings)
        return
    while True:
        try:
            text = input("prompt> ")
        except EOFError:
            print()
            break
        if text.strip() == "exit":
            break
        sample(model, tok, text, **settings)


def define_flags():
    flags.DEFINE_string("ckpt", None, "jaxgpt model directory or training workdir")
    flags.DEFINE_string("step", "latest", "a training workdir's checkpoint: latest, best (lowest val loss) or N")
    flags.DEFINE_string("hf", None, "local Hugging Face GPT-2 directory (config.json + model.safetensors)")
    flags.DEFINE_string("tokenizer", "", "'gpt2' or a data directory; empty: the tokenizer saved with the model "
                        "(a training workdir, an imported or exported model), else GPT-2 BPE")
    flags.DEFINE_string("prompt", "", "prompt text, or FILE:path; empty starts from <|endoftext|>")
    flags.DEFINE_integer("max_new_tokens", 200, "tokens to generate per sample (prompt + these <= block_size)")
    flags.DEFINE_float("temperature", 0.8, "0 is greedy; below 1 sharpens, above 1 flattens")
    flags.DEFINE_integer("top_k", 200, "sample among the k most likely tokens; 0 keeps all")
    flags.DEFINE_float("top_p", None, "sample among the most likely tokens holding this much probability")
    flags.DEFINE_integer("num_samples", 1, "samples per prompt")
    flags.DEFINE_integer("seed", 1337, "sample i uses seed + i")
    flags.DEFINE_bool("interactive", False, "read prompts from stdin until 'exit' or EOF")


if __name__ == "__main__":
    define_flags()
    cli.run(main)
