"""`python -m jaxgpt.prepare`: text -> token shards (DIR/train_*.bin, DIR/val_*.bin, DIR/tokenizer.json).

    python -m jaxgpt.prepare --dataset=tinyshakespeare --tokenizer=char --out=data/shakespeare_char
    python -m jaxgpt.prepare --input='notes/*.txt' --tokenizer=gpt2 --out=data/notes
    python -m jaxgpt.prepare --dataset=fineweb_edu --tokenizer=gpt2 --out=data/fineweb10B  # needs `datasets`
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import glob
import hashlib
import multiprocessing
import os
import shutil
import sys
import tempfile
import urllib.request

import numpy as np
from absl import logging
from tqdm import tqdm

from jaxgpt import data
from jaxgpt.data import write_shard
from jaxgpt.errors import UserFileExistsError, UserFileNotFoundError, UserRuntimeError, UserValueError
from jaxgpt.tokenizer import TOKENIZER_FILE, CharTokenizer, Tokenizer, get_tokenizer

DATASETS = ("auto", "text", "tinyshakespeare", "stdlib_docs", "fineweb_edu")
TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"  # 1,115,394 bytes
DEFAULT_SHARD_SIZE = 10**8  # tokens per shard, as llm.c
# Standard-library modules never imported for stdlib_docs: they act on import (open a browser, print, start a
# GUI or a REPL), exist only on Windows, or are slow and deprecated.
STDLIB_SKIP = frozenset({"antigravity", "this", "tkinter", "turtle", "turtledemo", "idlelib", "lib2to3", "readline",
                         "ensurepip", "distutils", "pydoc_data", "site", "msilib", "msvcrt", "nt", "winreg",
                         "winsound"})


def prepare(out_dir: str, *, dataset: str = "auto", input: str | None = None, tokenizer: str = "char",
            val_fraction: float = 0.1, shard_size: int = DEFAULT_SHARD_SIZE, overwrite: bool = False,
            num_proc: int | None = None, max_shards: int = 0) -> str:
    """Tokenizes a dataset into shards in out_dir and writes out_dir/tokenizer.json; returns out_dir.

    dataset: auto (--input if given, else tinyshakespeare if it can be downloaded, else stdlib_docs) | text
    (the files matching `input`) | tinyshakespeare | stdlib_docs | fineweb_edu (gpt2 only; num_proc
    tokenizing processes; max_shards > 0 stops early; its first shard is the validation split, as llm.c).
    """
    if dataset not in DATASETS:
        raise UserValueError(f"unknown dataset {dataset!r}: expected one of {DATASETS}")
    if tokenizer not in ("gpt2", "char"):
        raise UserValueError(f"unknown tokenizer {tokenizer!r}: expected 'gpt2' or 'char'")
    if not 0 < val_fraction < 1:
        raise UserValueError(f"val_fraction={val_fraction} must lie strictly between 0 and 1")
    if shard_size < 1:
        raise UserValueError(f"shard_size={shard_size} must be positive")
    if dataset == "fineweb_edu":
        if tokenizer != "gpt2":
            raise UserValueError("fineweb_edu is prepared with --tokenizer=gpt2 only")
        with _staging(out_dir, overwrite) as staging:
            _prepare_fineweb_edu(staging, shard_size, num_proc or max(1, (os.cpu_count() or 2) // 2), max_shards)
            get_tokenizer("gpt2").save(staging)
        return out_dir

    docs = _documents(dataset, input)
    if tokenizer == "char":
        docs = ["\n\n".join(docs)]  # a char vocabulary has no end-of-text token: a blank line separates documents
        tok = CharTokenizer.from_text(docs[0])
    else:
        tok = get_tokenizer("gpt2")
    train_docs, val_docs = split_documents(docs, val_fraction)
    with _staging(out_dir, overwrite) as staging:
        for split, split_docs in (("train", train_docs), ("val", val_docs)):
            tokens = encode_documents(tok, split_docs, desc=f"tokenizing {split}")
            _write_split(staging, split, tokens, shard_size)
        tok.save(staging)
    logging.info("prepared %s (%s tokenizer, vocab_size %d)", out_dir, tok.name, tok.vocab_size)
    return out_dir


def split_documents(docs: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """Cuts the concatenated documents at character (1 - val_fraction) * total, splitting the one it falls in."""
    cut = int(sum(map(len, docs)) * (1 - val_fraction))
    for i, doc in enumerate(docs):
        if cut <= len(doc):
            head, tail = doc[:cut], doc[cut:]
            return docs[:i] + ([head] if head else []), ([tail] if tail else []) + docs[i + 1:]
        cut -= len(doc)
    return list(docs), []


def encode_documents(tok: Tokenizer, docs: list[str], desc: str = "tokenizing") -> np.ndarray:
    """All documents' tokens as uint16, separated by the end-of-text token when the tokenizer has one."""
    if not docs:
        raise UserValueError("nothing to tokenize: the split is empty (a too small input, or val_fraction too close "
                             "to 0 or 1)")
    pieces = []
    for i, doc in enumerate(tqdm(docs, desc=desc, unit="doc", disable=len(docs) < 2)):
        if i and tok.eot is not None:
            pieces.append([tok.eot])
        pieces.append(tok.encode(doc))
    return np.concatenate([np.asarray(p, dtype=np.uint16) for p in pieces])


def _write_split(out_dir: str, split: str, tokens: np.ndarray, shard_size: int) -> None:
    starts = range(0, len(tokens), shard_size)
    for index, start in enumerate(tqdm(starts, desc=f"writing {split} shards", unit="shard", disable=len(starts) < 2)):
        write_shard(os.path.join(out_dir, f"{split}_{index:06d}.bin"), tokens[start:start + shard_size])
    logging.info("%s: %d tokens in %d shard(s)", split, len(tokens), len(starts))


@contextlib.contextmanager
def _staging(out_dir: str, overwrite: bool):
    """A fresh directory beside out_dir to prepare into, which becomes out_dir only when complete: a new out_dir is
    the staging directory renamed; an existing one (empty, or --overwrite) loses its old shards and receives the
    new files, tokenizer.json last. An interrupted preparation leaves out_dir as it was, or without tokenizer.json."""
    existing = [f for split in ("train", "val") for f in data.split_files(out_dir, split)]
    if existing and not overwrite:
        raise UserFileExistsError(f"{out_dir} already holds shards ({os.path.basename(existing[0])}, ...): "
                                  "choose another --out or pass --overwrite")
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out_dir))}.partial-", dir=parent)
    try:
        yield staging
        if not os.path.isdir(out_dir):
            os.rename(staging, out_dir)
            return
        for path in existing + [os.path.join(out_dir, TOKENIZER_FILE)]:
            if os.path.exists(path):
                os.remove(path)
        for name in sorted(os.listdir(staging), key=lambda n: n == TOKENIZER_FILE):
            os.replace(os.path.join(staging, name), os.path.join(out_dir, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _documents(dataset: str, input: str | None) -> list[str]:
    if dataset == "auto":
        if input:
            return _read_text_files(input)
        try:
            return [_tinyshakespeare(None)]
        except RuntimeError as e:
            logging.warning("%s", e)
            logging.warning("dataset=auto: tinyshakespeare is unreachable, using the stdlib_docs fallback corpus")
            return _stdlib_docs()
    if dataset == "text":
        if not input:
            raise UserValueError("dataset=text needs --input=FILE or a glob of text files")
        return _read_text_files(input)
    if dataset == "tinyshakespeare":
        return [_tinyshakespeare(input)]
    return _stdlib_docs()


def _read_text_files(pattern: str) -> list[str]:
    files = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
    if not files or not all(os.path.isfile(f) for f in files):
        raise UserFileNotFoundError(f"--input={pattern}: no such text file(s)")
    docs = []
    for path in files:
        with open(path, encoding="utf-8") as f:
            docs.append(f.read())
    logging.info("read %d file(s), %d characters, from %s", len(files), sum(map(len, docs)), pattern)
    return docs


def _tinyshakespeare(local_path: str | None) -> str:
    """The text of tinyshakespeare, from local_path or downloaded; its sha256 is checked either way."""
    if local_path:
        with open(local_path, "rb") as f:
            data, source = f.read(), local_path
    else:
        logging.info("downloading %s", TINYSHAKESPEARE_URL)
        try:
            with urllib.request.urlopen(TINYSHAKESPEARE_URL, timeout=20) as response:
                data, source = response.read(), TINYSHAKESPEARE_URL
        except OSError as e:
            raise UserRuntimeError(f"could not download tinyshakespeare from {TINYSHAKESPEARE_URL} ({e}); offline, "
                                   "pass a local copy with --input=path/to/input.txt") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != TINYSHAKESPEARE_SHA256:
        raise UserRuntimeError(f"{source}: {len(data)} bytes with sha256 {digest}, not tinyshakespeare "
                               f"(1115394 bytes, sha256 {TINYSHAKESPEARE_SHA256}); use --dataset=text for other text")
    return data.decode("utf-8")


def _stdlib_docs() -> list[str]:
    """One document per standard-library module: its docstrings. Gathered in a fresh process so that importing
    ~190 modules leaves the caller untouched."""
    logging.info("stdlib_docs: gathering the docstrings of the Python %d.%d standard library as a training corpus",
                 *sys.version_info[:2])
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        docs = pool.submit(stdlib_docstrings).result()
    logging.info("stdlib_docs: %d modules, %d characters", len(docs), sum(map(len, docs)))
    return docs


def stdlib_docstrings() -> list[str]:
    """Docstrings of the public standard-library modules (sorted) and of the classes, functions and methods each
    defines, in name order. Imports those modules into this process."""
    import contextlib
    import importlib
    import inspect
    import io
    import warnings

    def doc(obj) -> str | None:
        text = getattr(obj, "__doc__", None)
        return inspect.cleandoc(text) if isinstance(text, str) and text.strip() else None

    docs = []
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in STDLIB_SKIP:
            continue
        quiet = io.StringIO()
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
                warnings.simplefilter("ignore")
                module = importlib.import_module(name)
        except Exception:  # noqa: BLE001 -- platform-specific or broken modules are simply left out
            continue
        parts = [f"Module {name}\n\n{text}"] if (text := doc(module)) else []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecated module attributes warn when read
            for attr, obj in sorted(vars(module).items()):
                if attr.startswith("_") or getattr(obj, "__module__", None) != name:
                    continue
                if not (inspect.isclass(obj) or inspect.isroutine(obj)):
                    continue
                if text := doc(obj):
                    parts.append(f"{name}.{attr}\n\n{text}")
                members = sorted(vars(obj).items()) if inspect.isclass(obj) else []
                for member_name, member in members:
                    member = getattr(member, "__func__", member)  # classmethod / staticmethod
                    if not member_name.startswith("_") and (text := doc(member)):
                        parts.append(f"{name}.{attr}.{member_name}\n\n{text}")
        if parts:
            docs.append("\n\n".join(parts))
    return docs


def _prepare_fineweb_edu(out_dir: str, shard_size: int, num_proc: int, max_shards: int) -> None:
    """HuggingFaceFW/fineweb-edu sample-10BT, streamed, tokenized in num_proc processes into shards of shard_size
    tokens (documents start with <|endoftext|> and may straddle shards); shard 0 is val, as in llm.c.
    Needs the network and `datasets`, so it is not covered by the tests."""
    try:
        import datasets
    except ImportError:
        raise UserRuntimeError("--dataset=fineweb_edu needs Hugging Face datasets: pip install 'jaxgpt[hf]'") from None
    logging.info("fineweb_edu: streaming sample-10BT with %d tokenizing processes; --val_fraction is ignored "
                 "(the first shard is the validation split)", num_proc)
    stream = datasets.load_dataset("HuggingFaceFW/fineweb-edu", name="sample-10BT", split="train", streaming=True)
    buffer, filled, index = np.empty(shard_size, dtype=np.uint16), 0, 0
    with multiprocessing.get_context("spawn").Pool(num_proc) as pool, tqdm(total=shard_size, unit="tok") as bar:
        for tokens in pool.imap(_tokenize_fineweb_doc, (row["text"] for row in stream), chunksize=16):
            while len(tokens):
                take = min(len(tokens), shard_size - filled)
                buffer[filled:filled + take], tokens, filled = tokens[:take], tokens[take:], filled + take
                bar.update(take)
                if filled == shard_size:
                    _write_fineweb_shard(out_dir, index, buffer)
                    index, filled = index + 1, 0
                    if max_shards and index >= max_shards:
                        return
                    bar.reset(total=shard_size)
    if filled:
        _write_fineweb_shard(out_dir, index, buffer[:filled])


def _tokenize_fineweb_doc(text: str) -> np.ndarray:
    tok = get_tokenizer("gpt2")
    return np.asarray([tok.eot] + tok.encode(text), dtype=np.uint16)


def _write_fineweb_shard(out_dir: str, index: int, tokens: np.ndarray) -> None:
    split = "val" if index == 0 else "train"
    write_shard(os.path.join(out_dir, f"{split}_{index:06d}.bin"), tokens)


def main(argv):
    del argv
    from absl import flags

    f = flags.FLAGS
    prepare(f.out, dataset=f.dataset, input=f.input or None, tokenizer=f.tokenizer, val_fraction=f.val_fraction,
            shard_size=f.shard_size, overwrite=f.overwrite, num_proc=f.num_proc or None, max_shards=f.max_shards)


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("input", "", "text file or glob (quote it) to tokenize; with --dataset=auto or text")
    flags.DEFINE_enum("dataset", "auto", DATASETS, "auto: --input if given, else tinyshakespeare if it can be "
                      "downloaded, else stdlib_docs (Python standard library docstrings, offline)")
    flags.DEFINE_enum("tokenizer", "char", ["gpt2", "char"], "GPT-2 BPE or character level")
    flags.DEFINE_string("out", None, "output directory for the shards and tokenizer.json", required=True)
    flags.DEFINE_float("val_fraction", 0.1, "share of the text (its end) kept for validation")
    flags.DEFINE_integer("shard_size", DEFAULT_SHARD_SIZE, "tokens per shard")
    flags.DEFINE_bool("overwrite", False, "replace shards already in --out")
    flags.DEFINE_integer("num_proc", 0, "fineweb_edu tokenizing processes; 0: half the CPUs")
    flags.DEFINE_integer("max_shards", 0, "fineweb_edu: stop after this many shards; 0: the whole sample")


if __name__ == "__main__":
    from jaxgpt import cli

    _define_flags()
    cli.run(main)
