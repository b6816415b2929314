"""Evaluation: mean loss / perplexity over a token split, and HellaSwag accuracy (docs/architecture.md).

    python -m jaxgpt.evaluate --ckpt=out/model --task=loss --data=data/shakespeare_char [--split=val] [--stride=128]
    python -m jaxgpt.evaluate --ckpt=out/model --task=hellaswag --data=hellaswag_val.jsonl [--limit=1000]
"""
from __future__ import annotations

import functools
import glob
import json
import math
import os
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging
from flax import nnx

from jaxgpt import cli, data
from jaxgpt.errors import UserFileNotFoundError, UserValueError
from jaxgpt.generate import prompt_bucket
from jaxgpt.model import GPT, token_nll

HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
NUM_ENDINGS = 4


@functools.partial(jax.jit, static_argnames="graphdef")
def row_nll(graphdef, params, inputs, targets):
    """inputs, targets (B, T) -> summed negative log-likelihood and target count per row; targets < 0 are skipped."""
    nll = token_nll(nnx.merge(graphdef, params)(inputs)[0], targets)  # (B, T)
    return jnp.sum(nll, axis=-1), jnp.sum(targets >= 0, axis=-1)


def score_rows(model: GPT, rows: Iterator[tuple[np.ndarray, np.ndarray]], batch_size: int, length: int):
    """Runs (inputs, targets) rows of up to `length` tokens through the model, `batch_size` at a time, padded to
    one shape (so one compilation). Yields (nll sum, target count) per row, in order."""
    graphdef, params = nnx.split(model)
    batch: list = []

    def flush():
        inputs = np.zeros((batch_size, length), np.int32)
        targets = np.full((batch_size, length), -1, np.int32)
        for i, (x, y) in enumerate(batch):
            inputs[i, :len(x)], targets[i, :len(y)] = x, y
        sums, counts = jax.device_get(row_nll(graphdef, params, inputs, targets))
        n = len(batch)
        batch.clear()
        return zip(sums[:n].astype(np.float64).tolist(), counts[:n].tolist())

    for row in rows:
        batch.append(row)
        if len(batch) == batch_size:
            yield from flush()
    if batch:
        yield from flush()


# ---- loss / perplexity ----

def loss_windows(tokens: np.ndarray, block_size: int, stride: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(inputs, targets) windows over a token stream; each target token is scored exactly once (-1 elsewhere)."""
    last = len(tokens) - 1  # the number of targets: tokens[1:]
    scored = 0  # targets tokens[1 : scored + 1] are done
    for begin in range(0, max(last, 0), stride):
        end = min(begin + block_size, last)
        inputs = np.asarray(tokens[begin:end], np.int32)
        targets = np.asarray(tokens[begin + 1:end + 1], np.int32)
        targets[:len(targets) - (end - scored)] = -1  # seen by an earlier window: context only
        yield inputs, targets
        scored = end
        if end == last:
            break


def evaluate_loss(model: GPT, streams: list[np.ndarray], *, block_size: int | None = None,
                  stride: int | None = None, batch_size: int = 4) -> dict:
    """Mean next-token loss and perplexity over token streams (e.g. the shards of a split), scored separately."""
    block_size = block_size or model.config.block_size
    stride = stride or block_size
    if not 0 < block_size <= model.config.block_size:
        raise UserValueError(f"block_size={block_size} must be in [1, {model.config.block_size}] (the model's)")
    if not 0 < stride <= block_size:
        raise UserValueError(f"stride={stride} must be in [1, block_size={block_size}]")
    rows = (w for tokens in streams for w in loss_windows(tokens, block_size, stride))
    total, count = 0.0, 0
    for nll, n in score_rows(model, rows, batch_size, block_size):
        total, count = total + nll, count + n
    if count == 0:
        raise UserValueError("no tokens to score: every stream is shorter than 2 tokens")
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": count}


def read_split(data_arg: str, split: str, vocab_size: int) -> list[np.ndarray]:
    """The shards of a data directory's split, or the files a glob names; every token checked against the vocab."""
    files = data.find_shards(data_arg, split) if os.path.isdir(data_arg) else sorted(glob.glob(data_arg))
    if not files:
        raise UserFileNotFoundError(f"--data={data_arg}: neither a directory nor a glob matching any file")
    return [data.read_shard(f, vocab_size=vocab_size) for f in files]


# ---- HellaSwag ----

def read_hellaswag(path: str, limit: int | None = None) -> list[dict]:
    """Examples of a HellaSwag jsonl file, each checked: ctx (str), endings (4 str), label (0-3)."""
    if not os.path.isfile(path):
        raise UserFileNotFoundError(f"{path}: no such HellaSwag file; download the validation set from {HELLASWAG_URL}")
    examples = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if limit is not None and len(examples) >= limit:
                break
            if not line.strip():
                continue
            try:
                example = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserValueError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
            problem = _hellaswag_problem(example)
            if problem:
                raise UserValueError(f"{path}:{line_no}: {problem}")
            examples.append(example)
    if not examples:
        raise UserValueError(f"{path}: no examples")
    return examples


def _hellaswag_problem(example) -> str | None:
    if not isinstance(example, dict):
        return f"expected a JSON object, got {type(example).__name__}"
    if not isinstance(example.get("ctx"), str):
        return "'ctx' must be a string"
    endings = example.get("endings")
    if not (isinstance(endings, list) and len(endings) == NUM_ENDINGS and all(isinstance(e, str) for e in endings)):
        return f"'endings' must be a list of {NUM_ENDINGS} strings"
    label = example.get("label")
    if isinstance(label, str) and label.isdigit():  # some copies store the label as a string
        example["label"] = label = int(label)
    if not (isinstance(label, int) and 0 <= label < NUM_ENDINGS):
        return f"'label' must be an integer in [0, {NUM_ENDINGS}), got {label!r}"
    return None


def ending_rows(example: dict, tokenizer, block_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The 4 (inputs, targets) rows of an example: context + ending, targets only over the ending's tokens.
    Too long a row loses context tokens from its start."""
    context = tokenizer.encode(example["ctx"])
    rows = []
    for ending in example["endings"]:
        completion = tokenizer.encode(" " + ending)  # GPT-2 BPE: the space belongs to the ending's first token
        tokens = np.asarray(context + completion, np.int32)[-(block_size + 1):]
        targets = tokens[1:].copy()
        targets[:len(targets) - len(completion)] = -1
        rows.append((tokens[:-1], targets))
    return rows


def score_endings(model: GPT, tokenizer, examples: list[dict], *, batch_examples: int = 4):
    """-> (sum_loss, mean_loss), each (N, 4): completion loss of every ending, summed and per token."""
    block = model.config.block_size
    rows = [row for ex in examples for row in ending_rows(ex, tokenizer, block)]
    length = min(block, prompt_bucket(max(len(x) for x, _ in rows)))
    scores = np.array(list(score_rows(model, iter(rows), NUM_ENDINGS * batch_examples, length)))  # (4N, 2)
    sums = scores[:, 0].reshape(-1, NUM_ENDINGS)
    return sums, sums / np.maximum(scores[:, 1].reshape(-1, NUM_ENDINGS), 1)


def hellaswag_eval(model: GPT, tokenizer, path: str, limit: int | None = None, *, batch_examples: int = 4) -> dict:
    """{'acc', 'acc_norm', 'examples'} over the first `limit` examples of a HellaSwag jsonl file (all if None)."""
    examples = read_hellaswag(path, limit)
    sums, means = score_endings(model, tokenizer, examples, batch_examples=batch_examples)
    labels = np.array([ex["label"] for ex in examples])
    return {"acc": float(np.mean(sums.argmin(1) == labels)), "acc_norm": float(np.mean(means.argmin(1) == labels)),
            "examples": len(examples)}


def main(argv):
    if len(argv) > 1:
        raise UserValueError(f"unexpected arguments {argv[1:]}")
    from jaxgpt.sample import load_model, load_tokenizer
    logging.set_verbosity(logging.WARNING)  # orbax logs every restore at INFO
    f = flags.FLAGS
    model = load_model(f.ckpt, f.hf, f.step)
    if f.task == "loss":
        streams = read_split(f.data, f.split, model.config.n_valid_vocab)
        result = evaluate_loss(model, streams, block_size=f.block_size, stride=f.stride, batch_size=f.batch_size)
        print(f"{f.split} loss {result['loss']:.4f} perplexity {result['perplexity']:.3f} "
              f"over {result['tokens']} tokens")
    else:
        result = hellaswag_eval(model, load_tokenizer(f.tokenizer, model), f.data, f.limit or None)
        print(f"hellaswag acc {result['acc']:.4f} acc_norm {result['acc_norm']:.4f} "
              f"over {result['examples']} examples")


def define_flags():
    flags.DEFINE_string("ckpt", None, "jaxgpt model directory or training workdir")
    flags.DEFINE_string("step", "latest", "a training workdir's checkpoint: latest, best (lowest val loss) or N")
    flags.DEFINE_string("hf", None, "local Hugging Face GPT-2 directory, instead of --ckpt")
    flags.DEFINE_enum("task", "loss", ["loss", "hellaswag"], "what to evaluate")
    flags.DEFINE_string("data", None, "loss: a data directory or a glob of shards; hellaswag: the jsonl file",
                        required=True)
    flags.DEFINE_string("split", "val", "loss: the split of a data directory")
    flags.DEFINE_integer("block_size", None, "loss: window length (default: the model's)")
    flags.DEFINE_integer("stride", None, "loss: slide windows by this many tokens (default: block_size)")
    flags.DEFINE_integer("batch_size", 4, "loss: windows per forward pass")
    flags.DEFINE_string("tokenizer", "gpt2", "hellaswag: 'gpt2' or a data directory holding tokenizer.json")
    flags.DEFINE_integer("limit", 0, "hellaswag: score only the first N examples; 0 scores all")


if __name__ == "__main__":
    define_flags()
    cli.run(main)
