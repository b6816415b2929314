"""Tokenizers against exact ids, Hugging Face's GPT-2 tokenizer as the reference, and the real tinyshakespeare."""
import hashlib
import json
import os

import corpus
import pytest
import tiktoken.load

from jaxgpt import tokenizer as tokenizer_lib
from jaxgpt.tokenizer import CharTokenizer, get_tokenizer, load_tokenizer

SAMPLES = [
    "Hello world",
    " héllo  wörld\n\n  ✓ 123456 don't  \n",
    "First Citizen:\nBefore we proceed any further, hear me speak.\n",
    "日本語のテキストと emoji 🙂, tabs\tand   spaces",
]


SHAKESPEARE_CHARS = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"  # nanoGPT's 65


def shakespeare_like() -> str:
    """Corpus text in tinyshakespeare's 65 characters, each of them present."""
    return SHAKESPEARE_CHARS + "".join(c for c in corpus.text(100_000) if c in SHAKESPEARE_CHARS)


@pytest.fixture
def offline_tiktoken(monkeypatch):
    """tiktoken must never reach for the network: any URL read fails the test."""
    real_read_file = tiktoken.load.read_file

    def read_file(blobpath):
        assert "://" not in blobpath, f"tiktoken tried to download {blobpath}"
        return real_read_file(blobpath)

    monkeypatch.setattr(tiktoken.load, "read_file", read_file)
    tokenizer_lib._gpt2_encoding.cache_clear()
    yield
    tokenizer_lib._gpt2_encoding.cache_clear()


def test_gpt2_exact_ids_and_special_token():
    tok = get_tokenizer("gpt2")
    assert tok.encode("Hello world") == [15496, 995]
    assert (tok.name, tok.vocab_size, tok.eot) == ("gpt2", 50257, 50256)
    assert tok.encode("<|endoftext|>", allowed_special={"<|endoftext|>"}) == [50256]
    plain = tok.encode("<|endoftext|>")  # not allowed: encoded as ordinary text, never as the special id
    assert 50256 not in plain and tok.decode(plain) == "<|endoftext|>"
    assert tok.decode([15496, 995, 50256]) == "Hello world<|endoftext|>"


def test_gpt2_matches_hugging_face_and_round_trips():
    GPT2Tokenizer = pytest.importorskip("transformers").GPT2Tokenizer

    files = tokenizer_lib.bundled_gpt2_files()
    with open(files["encoder.json"]) as f:
        vocab = json.load(f)
    with open(files["vocab.bpe"], encoding="utf-8") as f:
        merges = [tuple(line.split()) for line in f.read().split("\n")[1:-1]]
    reference = GPT2Tokenizer(vocab=vocab, merges=merges)
    tok = get_tokenizer("gpt2")
    for text in SAMPLES + [corpus.text(5000)]:
        ids = tok.encode(text)
        assert ids == reference.encode(text)
        assert tok.decode(ids) == text
    assert tok.encode_batch(SAMPLES) == [tok.encode(t) for t in SAMPLES]


def test_gpt2_uses_tiktoken_cache_when_present_without_writing_one(tmp_path, monkeypatch, offline_tiktoken):
    empty = tmp_path / "empty_cache"
    empty.mkdir()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(empty))
    from_bundle = tokenizer_lib._gpt2_encoding()
    assert os.listdir(empty) == []  # the bundled files were not copied into tiktoken's cache
    assert os.environ["TIKTOKEN_CACHE_DIR"] == str(empty)

    cache = tmp_path / "cache"  # what tiktoken leaves after downloading gpt2: files named sha1(url)
    cache.mkdir()
    for name, (url, _) in tokenizer_lib._GPT2_FILES.items():
        with open(tokenizer_lib.bundled_gpt2_files()[name], "rb") as f:
            (cache / hashlib.sha1(url.encode()).hexdigest()).write_bytes(f.read())
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    tokenizer_lib._gpt2_encoding.cache_clear()
    from_cache = tokenizer_lib._gpt2_encoding()
    assert from_cache is tiktoken.get_encoding("gpt2")
    assert from_cache.encode_ordinary("Hello world") == from_bundle.encode_ordinary("Hello world") == [15496, 995]
    for text in SAMPLES:
        assert from_cache.encode_ordinary(text) == from_bundle.encode_ordinary(text)


def test_char_vocab_of_tinyshakespeare():
    text = shakespeare_like()
    tok = get_tokenizer("char", text=text)
    assert tok.vocab_size == 65  # nanoGPT's shakespeare_char
    assert "".join(tok.chars) == SHAKESPEARE_CHARS
    assert tok.eot is None and tok.name == "char"
    assert tok.encode("hii there") == [46, 47, 47, 1, 58, 46, 43, 56, 43]  # Karpathy's "Let's build GPT" example
    ids = tok.encode(text)
    assert len(ids) == len(text) and max(ids) == 64
    assert tok.decode(ids) == text


def test_char_errors_name_the_problem():
    tok = CharTokenizer(list("abc"))
    with pytest.raises(ValueError, match="'z' is not in"):
        tok.encode("abz")
    with pytest.raises(ValueError, match="token id 3 is outside"):
        tok.decode([0, 3])
    with pytest.raises(ValueError, match="distinct single characters"):
        CharTokenizer(["a", "a"])
    with pytest.raises(ValueError, match="exactly one of"):
        get_tokenizer("char")
    with pytest.raises(ValueError, match="unknown tokenizer 'bpe'"):
        get_tokenizer("bpe")


def test_load_tokenizer_round_trip(tmp_path):
    char = get_tokenizer("char", text="to be or not to be\n")
    char.save(str(tmp_path))
    loaded = load_tokenizer(str(tmp_path))
    assert isinstance(loaded, CharTokenizer) and loaded.chars == char.chars
    assert loaded.encode("not to be") == char.encode("not to be")

    get_tokenizer("gpt2").save(str(tmp_path))
    assert json.loads((tmp_path / "tokenizer.json").read_text()) == {"kind": "gpt2"}
    assert load_tokenizer(str(tmp_path)).encode("Hello world") == [15496, 995]


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"holds no tokenizer.*jaxgpt\.prepare"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text('{"kind": "sentencepiece"}')
    with pytest.raises(ValueError, match="tokenizer.json: expected"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text('{"kind": ')
    with pytest.raises(ValueError, match="tokenizer.json: not valid JSON"):
        load_tokenizer(str(tmp_path))


def nanogpt_char_dir(directory, text: str):
    """A data dir as nanoGPT's data/shakespeare_char/prepare.py writes it: train.bin, val.bin, meta.pkl."""
    import pickle

    import numpy as np
    chars = sorted(set(text))
    stoi, itos = {ch: i for i, ch in enumerate(chars)}, dict(enumerate(chars))
    n = int(len(text) * 0.9)
    os.makedirs(directory, exist_ok=True)
    np.array([stoi[c] for c in text[:n]], dtype=np.uint16).tofile(os.path.join(directory, "train.bin"))
    np.array([stoi[c] for c in text[n:]], dtype=np.uint16).tofile(os.path.join(directory, "val.bin"))
    with open(os.path.join(directory, "meta.pkl"), "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": itos, "stoi": stoi}, f)
    return str(directory)


def test_nanogpt_meta_pkl_is_the_char_vocabulary(tmp_path):
    text = shakespeare_like()
    tok = load_tokenizer(nanogpt_char_dir(tmp_path, text))
    assert isinstance(tok, CharTokenizer) and tok.chars == list(SHAKESPEARE_CHARS) and tok.vocab_size == 65
    assert tok.encode("Hi!\n") == [SHAKESPEARE_CHARS.index(c) for c in "Hi!\n"]


class RunsCode:
    """Unpickling this runs a shell command: what a malicious meta.pkl does."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.mark.parametrize("content, message", [
    (lambda marker: {"vocab_size": 1, "itos": {0: RunsCode(f"touch {marker}")}},
     r"meta.pkl: refused: it refers to posix.system, and a meta.pkl may hold only dicts, lists, strings and ints"),
    (lambda marker: {"vocab_size": 2, "itos": {0: "a", 1: 2.5}}, "expected nanoGPT's meta.pkl, a dict of plain data"),
    (lambda marker: {"vocab_size": 3, "itos": {0: "a", 1: "b"}}, r"'itos' must map every id 0..2"),
    (lambda marker: {"itos": {0: "a", 1: "ab"}}, "a char vocabulary must be distinct single characters"),
])
def test_meta_pkl_that_is_not_plain_data_is_refused(tmp_path, content, message):
    import pickle
    marker = tmp_path / "code_ran"
    (tmp_path / "meta.pkl").write_bytes(pickle.dumps(content(marker)))
    with pytest.raises(ValueError, match=message):
        load_tokenizer(str(tmp_path))
    assert not marker.exists()


def test_truncated_meta_pkl_is_a_clear_error(tmp_path):
    import pickle
    (tmp_path / "meta.pkl").write_bytes(pickle.dumps({"itos": {0: "a"}})[:-3])
    with pytest.raises(ValueError, match=r"meta.pkl: not a readable pickle \(UnpicklingError|EOFError"):
        load_tokenizer(str(tmp_path))


def test_shards_without_a_tokenizer_are_gpt2_bpe(tmp_path):
    # nanoGPT's openwebtext (train.bin, val.bin) and llm.c's fineweb dirs have neither tokenizer.json nor meta.pkl
    from jaxgpt import data
    data.write_shard(str(tmp_path / "fineweb_train_000001.bin"), [15496, 995])  # llm.c's names
    data.write_shard(str(tmp_path / "fineweb_val_000000.bin"), [15496, 995])
    assert isinstance(load_tokenizer(str(tmp_path)), tokenizer_lib.GPT2Tokenizer)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no tokenizer .* and no shards"):
        load_tokenizer(str(tmp_path / "empty"))
