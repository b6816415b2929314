"""`python -m jaxgpt.prepare`: text -> token shards (DIR/train_*.bin, DIR/val_*.bin, DIR/tokenizer.json).

    python -m jaxgpt.prepare --dataset=tinyshakespeare --tokenizer=char --out=data/shakespeare_char
    python -m jaxgpt.prepare --input='notes/*.txt' --tokenizer=gpt2 --num_proc=8 --out=data/notes
    python -m jaxgpt.prepare --dataset=fineweb_edu --tokenizer=gpt2 --out=data/fineweb10B  # needs `datasets`
    python -m jaxgpt.prepare --dataset=hf:HuggingFaceFW/fineweb-edu --hf_config=sample-100BT --tokenizer=gpt2 \
        --out=data/fineweb100B
    python -m jaxgpt.prepare --dataset='hf:corpus/*.jsonl' --text_field=content --tokenizer=gpt2 --out=data/corpus
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import glob
import hashlib
import itertools
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
import urllib.request

import numpy as np
from absl import logging
from tqdm import tqdm

# jaxgpt.data (grain, jax) is imported where shards are written: the tokenizing processes import this module.
from jaxgpt.errors import UserFileExistsError, UserFileNotFoundError, UserRuntimeError, UserValueError
from jaxgpt.tokenizer import TOKENIZER_FILE, CharTokenizer, Tokenizer, from_json, get_tokenizer, train_bpe

DATASETS = ("auto", "text", "tinyshakespeare", "stdlib_docs", "fineweb_edu")  # and hf:PATH_OR_NAME
TOKENIZERS = ("char", "gpt2", "bpe")
BPE_SAMPLE_CHARS = 10**9  # characters of an hf stream a BPE is trained on
HF_PRESETS = {"fineweb_edu": ("HuggingFaceFW/fineweb-edu", "sample-10BT")}  # dataset -> (hf path or name, config)
# A local data file or glob is read by datasets' builder for its format (a directory or a hub name goes as it is).
HF_FILE_BUILDERS = {".parquet": ("parquet", {}), ".jsonl": ("json", {}), ".json": ("json", {}), ".csv": ("csv", {}),
                    ".txt": ("text", {"sample_by": "document"})}
CHUNK_CHARS = 1 << 21  # a longer text document is tokenized in pieces of about this many characters
PARALLEL_MIN_CHARS = 1 << 23  # less text is tokenized in this process when num_proc=0: a pool takes seconds to start
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
            num_proc: int = 0, max_shards: int = 0, hf_config: str | None = None, hf_split: str = "train",
            text_field: str = "text", vocab_size: int = 0, bpe_sample_chars: int = BPE_SAMPLE_CHARS) -> str:
    """Tokenizes a dataset into shards in out_dir and writes out_dir/tokenizer.json; returns out_dir.

    dataset: auto (--input if given, else tinyshakespeare if it can be downloaded, else stdlib_docs) | text
    (the files matching `input`) | tinyshakespeare | stdlib_docs | hf:PATH_OR_NAME (anything
    `datasets.load_dataset` takes: a hub name with config hf_config, a local directory, data files or a glob of
    them; rows' text in text_field; streamed; gpt2 only; max_shards > 0 stops early; its first shard is the
    validation split, as llm.c) | fineweb_edu (hf:HuggingFaceFW/fineweb-edu, config sample-10BT).
    tokenizer: char | gpt2 | bpe (a byte-level BPE of vocab_size tokens trained here with Hugging Face tokenizers,
    on the train text, or on the first bpe_sample_chars characters of an hf stream).
    num_proc: GPT-2 / BPE tokenizing processes; 0: half the CPUs, or this process alone for a text input under
    PARALLEL_MIN_CHARS characters.
    """
    hf = _hf_source(dataset, hf_config)
    _check_options(tokenizer, vocab_size, val_fraction, shard_size, num_proc)
    if hf:
        _check_hf_options(dataset, tokenizer, input, max_shards)
        with _staging(out_dir, overwrite) as staging:
            tok = (get_tokenizer("gpt2") if tokenizer == "gpt2" else
                   _train_bpe_on_hf(*hf, hf_split, text_field, vocab_size, bpe_sample_chars))
            _prepare_hf(staging, tok, *hf, hf_split, text_field, shard_size, num_proc or _half_the_cpus(), max_shards)
            tok.save(staging)
        return out_dir
    if hf_config or hf_split != "train" or text_field != "text" or max_shards:
        raise UserValueError("--hf_config, --hf_split, --text_field and --max_shards apply to --dataset=hf:... "
                             f"and fineweb_edu, not to --dataset={dataset}")
    _prepare_text(out_dir, _documents(dataset, input), tokenizer, val_fraction, shard_size, overwrite, num_proc,
                  vocab_size)
    return out_dir


def _check_options(tokenizer: str, vocab_size: int, val_fraction: float, shard_size: int, num_proc: int):
    if tokenizer not in TOKENIZERS:
        raise UserValueError(f"unknown tokenizer {tokenizer!r}: expected one of {TOKENIZERS}")
    if (tokenizer == "bpe") != bool(vocab_size):
        raise UserValueError(f"--vocab_size={vocab_size}: --tokenizer=bpe needs a --vocab_size (e.g. 8192), and only "
                             f"bpe takes one (the {tokenizer} tokenizer's vocabulary is fixed)")
    if not 0 < val_fraction < 1:
        raise UserValueError(f"val_fraction={val_fraction} must lie strictly between 0 and 1")
    if shard_size < 1:
        raise UserValueError(f"shard_size={shard_size} must be positive")
    if num_proc < 0:
        raise UserValueError(f"num_proc={num_proc} must be 0 (automatic) or a number of processes")


def _check_hf_options(dataset: str, tokenizer: str, input: str | None, max_shards: int):
    if tokenizer == "char":
        raise UserValueError(f"--dataset={dataset} is prepared with --tokenizer=gpt2 or bpe (a char vocabulary "
                             "would need the whole stream read first)")
    if input:
        raise UserValueError(f"--input does not apply to --dataset={dataset}: name the data in "
                             "--dataset=hf:PATH_OR_NAME")
    if max_shards < 0 or max_shards == 1:
        raise UserValueError(f"max_shards={max_shards}: expected 0 (the whole split) or at least 2 (the "
                             "validation shard and a train shard)")


def _prepare_text(out_dir: str, docs: list[str], tokenizer: str, val_fraction: float, shard_size: int,
                  overwrite: bool, num_proc: int, vocab_size: int):
    """Documents split by position into train and val, tokenized and written as shards with tokenizer.json."""
    if tokenizer == "char":
        docs = ["\n\n".join(docs)]  # a char vocabulary has no end-of-text token: a blank line separates documents
        tok, num_proc = CharTokenizer.from_text(docs[0]), 1
    else:
        num_proc = num_proc or (1 if sum(map(len, docs)) < PARALLEL_MIN_CHARS else _half_the_cpus())
    train_docs, val_docs = split_documents(docs, val_fraction)
    if tokenizer == "gpt2":
        tok = get_tokenizer("gpt2")
    elif tokenizer == "bpe":
        logging.info("training a %d-token byte-level BPE on %d characters", vocab_size, sum(map(len, train_docs)))
        tok = train_bpe(train_docs, vocab_size)
    with _staging(out_dir, overwrite) as staging, _encoder(tok, num_proc) as pool_encode:
        encode = pool_encode if tok.name != "char" else None
        for split, split_docs in (("train", train_docs), ("val", val_docs)):
            tokens = encode_documents(tok, split_docs, desc=f"tokenizing {split}", encode=encode)
            _write_split(staging, split, tokens, shard_size)
        tok.save(staging)
    logging.info("prepared %s (%s tokenizer, vocab_size %d)", out_dir, tok.name, tok.vocab_size)


def _hf_source(dataset: str, hf_config: str | None) -> tuple[str, str | None] | None:
    """(path or name, config) of a Hugging Face dataset, None for the others; an unknown dataset raises."""
    if dataset.startswith("hf:") and dataset[3:]:
        return dataset[3:], hf_config
    if dataset in HF_PRESETS:
        path, config = HF_PRESETS[dataset]
        return path, hf_config or config
    if dataset not in DATASETS:
        raise UserValueError(f"unknown dataset {dataset!r}: expected one of {DATASETS} or hf:PATH_OR_NAME")
    return None


def _half_the_cpus() -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2
    return max(1, cpus // 2)


def split_documents(docs: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """Cuts the concatenated documents at character (1 - val_fraction) * total, splitting the one it falls in."""
    cut = int(sum(map(len, docs)) * (1 - val_fraction))
    for i, doc in enumerate(docs):
        if cut <= len(doc):
            head, tail = doc[:cut], doc[cut:]
            return docs[:i] + ([head] if head else []), ([tail] if tail else []) + docs[i + 1:]
        cut -= len(doc)
    return list(docs), []


def encode_documents(tok: Tokenizer, docs: list[str], desc: str = "tokenizing", encode=None) -> np.ndarray:
    """All documents' tokens as uint16, separated by the end-of-text token when the tokenizer has one. Long
    documents are encoded in pieces (split_text), which leaves their tokens unchanged; `encode` maps the pieces to
    their tokens, in order (_encoder's, in processes), by default with tok.encode in this process."""
    if not docs:
        raise UserValueError("nothing to tokenize: the split is empty (a too small input, or val_fraction too close "
                             "to 0 or 1)")
    pieces = []  # (whether it begins a document after the first, its length) of each piece, in order

    def each_piece():  # lazily, so that a long document is not copied into pieces all at once
        for i, doc in enumerate(docs):
            for j, piece in enumerate(split_text(doc)):
                pieces.append((bool(i) and not j, len(piece)))
                yield piece

    encode = encode or (lambda texts: map(tok.encode, texts))
    out, total = [], sum(map(len, docs))
    with tqdm(total=total, desc=desc, unit="char", unit_scale=True, disable=total <= CHUNK_CHARS) as bar:
        for k, tokens in enumerate(encode(each_piece())):
            begins_a_doc, length = pieces[k]
            if begins_a_doc and tok.eot is not None:
                out.append(np.asarray([tok.eot], dtype=np.uint16))
            out.append(np.asarray(tokens, dtype=np.uint16))
            bar.update(length)
    return np.concatenate(out)


# A cut after a "\n" between two printable non-space ASCII characters leaves GPT-2's tokens unchanged: its
# pre-tokenizer (tokenizer._GPT2_PATTERN) cuts on both sides of that "\n" too, since only the whitespace alternatives
# take a "\n", `\s+(?!\S)` and `\s++$` fail before the next character, and `\s` takes the "\n" alone.
_SAFE_CUT = re.compile(r"(?<=[!-~])\n(?=[!-~])")


def split_text(text: str):
    """Yields text in pieces of at least CHUNK_CHARS characters (the last shorter), each cut after a _SAFE_CUT
    "\n"; text whole when it has no such "\n" past CHUNK_CHARS."""
    start = 0
    while len(text) - start > CHUNK_CHARS and (cut := _SAFE_CUT.search(text, start + CHUNK_CHARS)):
        yield text[start:cut.end()]
        start = cut.end()
    yield text[start:]


@contextlib.contextmanager
def _encoder(tok: Tokenizer, num_proc: int):
    """encode(texts, chunksize=1): the texts' tokens (uint16 arrays), lazily and in order, from num_proc spawned
    processes (not forked: a parent running JAX's threads can deadlock a fork), or this one for 1. The processes
    rebuild the tokenizer from its JSON."""
    if num_proc <= 1:
        yield lambda texts, chunksize=1: (np.asarray(tok.encode(t), dtype=np.uint16) for t in texts)
        return
    with multiprocessing.get_context("spawn").Pool(num_proc, _init_worker, (tok.to_json(),)) as pool:
        yield lambda texts, chunksize=1: pool.imap(_encode_in_worker, texts, chunksize=chunksize)


_worker_tokenizer: Tokenizer | None = None


def _init_worker(spec: dict) -> None:
    global _worker_tokenizer
    _worker_tokenizer = from_json(spec)


def _encode_in_worker(text: str) -> np.ndarray:
    return np.asarray(_worker_tokenizer.encode(text), dtype=np.uint16)


def _write_split(out_dir: str, split: str, tokens: np.ndarray, shard_size: int) -> None:
    starts = range(0, len(tokens), shard_size)
    for index, start in enumerate(tqdm(starts, desc=f"writing {split} shards", unit="shard", disable=len(starts) < 2)):
        _write_shard(out_dir, split, index, tokens[start:start + shard_size])
    logging.info("%s: %d tokens in %d shard(s)", split, len(tokens), len(starts))


def _write_shard(out_dir: str, split: str, index: int, tokens: np.ndarray) -> None:
    from jaxgpt.data import write_shard

    write_shard(os.path.join(out_dir, f"{split}_{index:06d}.bin"), tokens)


@contextlib.contextmanager
def _staging(out_dir: str, overwrite: bool):
    """A fresh directory beside out_dir to prepare into, which becomes out_dir only when complete: a new out_dir is
    the staging directory renamed; an existing one (empty, or --overwrite) loses its old shards and receives the
    new files, tokenizer.json last. An interrupted preparation leaves out_dir as it was, or without tokenizer.json."""
    from jaxgpt import data

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


def _train_bpe_on_hf(path: str, config: str | None, split: str, text_field: str, vocab_size: int,
                     sample_chars: int) -> Tokenizer:
    """A BPE trained on the first documents of the stream, up to sample_chars characters."""
    label = f"hf:{path}" + (f" (config {config})" if config else "")

    def sample():
        seen = 0
        for text in _hf_texts(_load_hf(path, config, split), text_field, label):
            if seen >= sample_chars:
                return
            seen += len(text)
            yield text
    logging.info("%s: training a %d-token byte-level BPE on up to %d characters of it", label, vocab_size,
                 sample_chars)
    return train_bpe(sample(), vocab_size)


def _prepare_hf(out_dir: str, tok: Tokenizer, path: str, config: str | None, split: str, text_field: str,
                shard_size: int, num_proc: int, max_shards: int) -> None:
    """A Hugging Face dataset split, streamed and tokenized in num_proc processes into shards of shard_size tokens,
    as llm.c's fineweb.py: every document starts with <|endoftext|>, documents may straddle shards, and shard 0
    (val_000000.bin) is the validation split, followed by train_000001.bin, ..."""
    label = f"hf:{path}" + (f" (config {config})" if config else "")
    stream = _load_hf(path, config, split)
    logging.info("%s: streaming split %s with %d tokenizing process(es); --val_fraction is ignored (the first shard "
                 "is the validation split)", label, split, num_proc)
    eot = np.asarray([tok.eot], dtype=np.uint16)
    written, total = 0, 0
    with _encoder(tok, num_proc) as encode:
        docs = tqdm(encode(_hf_texts(stream, text_field, label), chunksize=16), desc=label, unit="doc")
        shards = _fill_shards((t for doc in docs for t in (eot, doc)), shard_size)
        for shard in itertools.islice(shards, max_shards or None):
            _write_shard(out_dir, "train" if written else "val", written, shard)
            written, total = written + 1, total + len(shard)
    if not total:
        raise UserValueError(f"{label}, split {split}: no rows")
    if written < 2:
        raise UserValueError(f"{label}, split {split}: its {total} tokens fit in the validation shard "
                             f"(--shard_size={shard_size}), which leaves none to train on; pass a smaller "
                             f"--shard_size (e.g. {max(1, total // 10)})")
    logging.info("%s: %d tokens in %d shards, the first one val", label, total, written)


def _fill_shards(pieces, shard_size: int):
    """The token arrays `pieces`, concatenated, in shards of shard_size tokens (the last one shorter). A yielded
    shard is overwritten by the next one."""
    buffer, filled = np.empty(shard_size, dtype=np.uint16), 0
    for tokens in pieces:
        while len(tokens):
            take = min(len(tokens), shard_size - filled)
            buffer[filled:filled + take], tokens, filled = tokens[:take], tokens[take:], filled + take
            if filled == shard_size:
                yield buffer
                filled = 0
    if filled:
        yield buffer[:filled]


def _load_hf(path: str, config: str | None, split: str):
    """datasets.load_dataset(..., streaming=True) of a hub name, a local directory, or local data files."""
    try:
        import datasets
    except ImportError:
        raise UserRuntimeError("--dataset=hf:... and fineweb_edu need Hugging Face datasets: "
                               "pip install 'jaxgpt[hf]'") from None
    builder = HF_FILE_BUILDERS.get(os.path.splitext(path)[1].lower())
    args, kwargs = ((builder[0],), dict(builder[1], data_files=path)) if builder else ((path,), {})
    try:
        return datasets.load_dataset(*args, name=config, split=split, streaming=True, **kwargs)
    except Exception as e:  # noqa: BLE001 -- datasets raises many kinds (ConnectionError, ValueError, ...) for these
        raise UserRuntimeError(f"could not load the Hugging Face dataset {path!r} (config {config}, split "
                               f"{split!r}): {type(e).__name__}: {e}") from None


def _hf_texts(stream, text_field: str, label: str):
    for i, row in enumerate(stream):
        text = row.get(text_field)
        if not isinstance(text, str):
            what = "no field" if text_field not in row else f"{type(text).__name__}, not text, in its field"
            raise UserValueError(f"{label}: row {i} has {what} {text_field!r}; its fields are {list(row)}: name the "
                                 "one holding the text with --text_field")
        yield text


def main(argv):
    del argv
    from absl import flags

    f = flags.FLAGS
    prepare(f.out, dataset=f.dataset, input=f.input or None, tokenizer=f.tokenizer, val_fraction=f.val_fraction,
            shard_size=f.shard_size, overwrite=f.overwrite, num_proc=f.num_proc, max_shards=f.max_shards,
            hf_config=f.hf_config or None, hf_split=f.hf_split, text_field=f.text_field, vocab_size=f.vocab_size,
            bpe_sample_chars=f.bpe_sample_chars)


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("input", "", "text file or glob (quote it) to tokenize; with --dataset=auto or text")
    flags.DEFINE_string("dataset", "auto", f"one of {', '.join(DATASETS)}, or hf:PATH_OR_NAME (a Hugging Face "
                        "dataset: a hub name, a local directory, or data files (.parquet, .jsonl, .json, .csv, .txt) "
                        "or a glob of them). auto: --input if given, else tinyshakespeare if it can be downloaded, "
                        "else stdlib_docs (Python standard library docstrings, offline)")
    flags.DEFINE_enum("tokenizer", "char", list(TOKENIZERS), "character level, GPT-2 BPE, or bpe: a byte-level "
                      "BPE of --vocab_size tokens trained on this data (Hugging Face tokenizers)")
    flags.DEFINE_integer("vocab_size", 0, "bpe: tokens in the vocabulary, <|endoftext|> included (257..65536)")
    flags.DEFINE_integer("bpe_sample_chars", BPE_SAMPLE_CHARS, "bpe on an hf dataset: characters it is trained on")
    flags.DEFINE_string("out", None, "output directory for the shards and tokenizer.json", required=True)
    flags.DEFINE_float("val_fraction", 0.1, "share of the text (its end) kept for validation; not for hf datasets")
    flags.DEFINE_integer("shard_size", DEFAULT_SHARD_SIZE, "tokens per shard")
    flags.DEFINE_bool("overwrite", False, "replace shards already in --out")
    flags.DEFINE_integer("num_proc", 0, "GPT-2 tokenizing processes; 0: half the CPUs (a small text input: one)")
    flags.DEFINE_integer("max_shards", 0, "hf datasets: stop after this many shards; 0: the whole split")
    flags.DEFINE_string("hf_config", "", "hf datasets: the configuration (load_dataset's name); fineweb_edu: "
                        "sample-10BT unless given")
    flags.DEFINE_string("hf_split", "train", "hf datasets: the split to read")
    flags.DEFINE_string("text_field", "text", "hf datasets: the field of a row that holds its text")


if __name__ == "__main__":
    from jaxgpt import cli

    _define_flags()
    cli.run(main)
