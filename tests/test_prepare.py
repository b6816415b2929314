"""jaxgpt.prepare on Hugging Face datasets (local parquet and jsonl files made here, offline) and GPT-2 tokenizing
in processes (text files cut into pieces that leave the tokens unchanged)."""
import json
import os
import random
import re
import subprocess
import sys

import corpus
import numpy as np
import pytest

from jaxgpt import prepare as prepare_module
from jaxgpt.data import read_shard
from jaxgpt.prepare import prepare, split_documents, split_text
from jaxgpt.tokenizer import get_tokenizer, load_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Never the hub; and no torch, which a streaming dataset imports (seconds) when it is installed.
HF_ENV = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "USE_TORCH": "0"}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """HF_ENV here: datasets and huggingface_hub read it at import, so their flags are set too."""
    for name, value in HF_ENV.items():
        monkeypatch.setenv(name, value)
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "TORCH_AVAILABLE", False)


def documents(n: int, seed: int = 0) -> list[str]:
    """Short varied documents: words, numbers, unicode, blank lines, the literal text <|endoftext|>, an empty one,
    and a long one that spans several shards."""
    rng = random.Random(seed)
    words = ["the", "quick", "fox", "Ünïcödé", "日本語", "naïve", "42", "3.14", "<|endoftext|>", "\n", "\n\n", "  ",
             "don't", "it's", "🙂", "\t", "—", "x\ny", "café."]
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 40))) for _ in range(n)]
    docs[7] = ""
    docs[n // 2] = " ".join(f"word{i}" for i in range(2500))
    return docs


def expected_tokens(docs: list[str]) -> np.ndarray:
    tok = get_tokenizer("gpt2")
    return np.concatenate([np.asarray([tok.eot] + tok.encode(doc), dtype=np.uint16) for doc in docs])


def shards_in_order(out: str) -> list[str]:
    """llm.c's layout: val_000000.bin, then train_000001.bin, train_000002.bin, ..."""
    names = sorted(n for n in os.listdir(out) if n.endswith(".bin"))
    names = [n for n in names if n.startswith("val_")] + [n for n in names if n.startswith("train_")]
    assert names == ["val_000000.bin"] + [f"train_{i:06d}.bin" for i in range(1, len(names))]
    return [os.path.join(out, n) for n in names]


def write_jsonl(path, docs, field="content") -> str:
    with open(path, "w", encoding="utf-8") as f:
        for i, doc in enumerate(docs):
            f.write(json.dumps({"id": i, field: doc}) + "\n")
    return str(path)


# --- Hugging Face datasets -----------------------------------------------------------------------------------

def test_hf_parquet_directory_in_processes(tmp_path):
    """A local parquet dataset (two files), streamed and tokenized in 2 processes: every document after
    <|endoftext|>, literal "<|endoftext|>" text as plain text, documents straddling shards, full shards but the last."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = documents(300)
    (tmp_path / "parquet").mkdir()
    for part, rows in enumerate((docs[:150], docs[150:])):
        table = pa.table({"id": list(range(len(rows))), "text": rows})
        pq.write_table(table, tmp_path / "parquet" / f"part-{part:05d}.parquet")
    shard_size = 997
    out = prepare(str(tmp_path / "out"), dataset=f"hf:{tmp_path / 'parquet'}", tokenizer="gpt2",
                  shard_size=shard_size, num_proc=2)

    files = shards_in_order(out)
    shards = [read_shard(f, vocab_size=50257) for f in files]
    expected = expected_tokens(docs)
    assert len(files) == -(-len(expected) // shard_size) > 5
    assert all(len(s) == shard_size for s in shards[:-1]) and 0 < len(shards[-1]) <= shard_size
    np.testing.assert_array_equal(np.concatenate(shards), expected)
    tok = load_tokenizer(out)
    assert tok.name == "gpt2" and np.count_nonzero(expected == tok.eot) == len(docs)
    assert any(s[0] != tok.eot for s in shards[1:])  # a document goes on in the next shard
    assert sorted(os.listdir(tmp_path)) == ["out", "parquet"]  # no staging directory left


def test_hf_jsonl_file_with_a_text_field_and_max_shards(tmp_path):
    docs = documents(120, seed=1)
    path = write_jsonl(tmp_path / "docs.jsonl", docs)
    out = prepare(str(tmp_path / "out"), dataset=f"hf:{path}", text_field="content", tokenizer="gpt2",
                  shard_size=500, num_proc=1)
    expected = expected_tokens(docs)
    np.testing.assert_array_equal(np.concatenate([read_shard(f) for f in shards_in_order(out)]), expected)

    first = prepare(str(tmp_path / "first"), dataset=f"hf:{path}", text_field="content", tokenizer="gpt2",
                    shard_size=500, num_proc=1, max_shards=3)
    files = shards_in_order(first)
    assert len(files) == 3
    np.testing.assert_array_equal(np.concatenate([read_shard(f) for f in files]), expected[:1500])


def test_hf_dataset_errors(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", documents(20))
    out = str(tmp_path / "out")
    with pytest.raises(ValueError, match=r"row 0 has no field 'text'; its fields are \['id', 'content'\].*"
                                         "--text_field"):
        prepare(out, dataset=f"hf:{path}", tokenizer="gpt2", shard_size=100, num_proc=1)
    with pytest.raises(ValueError, match="row 0 has int, not text, in its field 'id'"):
        prepare(out, dataset=f"hf:{path}", text_field="id", tokenizer="gpt2", shard_size=100, num_proc=1)
    with pytest.raises(ValueError, match=r"tokens fit in the validation shard \(--shard_size=100000\).*smaller "
                                         "--shard_size"):
        prepare(out, dataset=f"hf:{path}", text_field="content", tokenizer="gpt2", shard_size=100_000, num_proc=1)
    with pytest.raises(ValueError, match="--tokenizer=gpt2 or bpe"):
        prepare(out, dataset=f"hf:{path}", text_field="content", tokenizer="char")
    with pytest.raises(RuntimeError, match="could not load the Hugging Face dataset .*nowhere"):
        prepare(out, dataset=f"hf:{tmp_path / 'nowhere'}", tokenizer="gpt2")  # a hub name, offline
    with pytest.raises(RuntimeError, match="dataset 'HuggingFaceFW/fineweb-edu' \\(config sample-10BT, split 'train'"):
        prepare(out, dataset="fineweb_edu", tokenizer="gpt2")  # the preset of hf:..., offline
    with pytest.raises(RuntimeError, match="dataset 'HuggingFaceFW/fineweb-edu' \\(config sample-100BT, split 'val'"):
        prepare(out, dataset="fineweb_edu", hf_config="sample-100BT", hf_split="val", tokenizer="gpt2")
    with pytest.raises(RuntimeError, match="could not load the Hugging Face dataset .*missing.parquet"):
        prepare(out, dataset=f"hf:{tmp_path / 'missing.parquet'}", tokenizer="gpt2")
    with pytest.raises(ValueError, match="max_shards=1: expected 0"):
        prepare(out, dataset=f"hf:{path}", tokenizer="gpt2", max_shards=1)
    with pytest.raises(ValueError, match="--text_field and --max_shards apply to --dataset=hf:"):
        prepare(out, dataset="text", input=path, text_field="content")
    with pytest.raises(ValueError, match="unknown dataset 'hf:'"):
        prepare(out, dataset="hf:")
    assert sorted(os.listdir(tmp_path)) == ["docs.jsonl"]


def test_prepare_cli_on_a_jsonl_file(tmp_path):
    docs = documents(50, seed=2)
    path = write_jsonl(tmp_path / "docs.jsonl", docs)
    out = tmp_path / "out"
    env = {**os.environ, **HF_ENV, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "jaxgpt.prepare", f"--dataset=hf:{path}", "--text_field=content",
                             "--tokenizer=gpt2", "--shard_size=300", "--num_proc=1", f"--out={out}"],
                            cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    np.testing.assert_array_equal(np.concatenate([read_shard(f) for f in shards_in_order(str(out))]),
                                  expected_tokens(docs))


# --- text files in processes ---------------------------------------------------------------------------------

def test_split_text_cuts_only_where_gpt2_tokens_stay_the_same(monkeypatch):
    rng = random.Random(0)
    fragments = ["x", "y", "Hello", " world", "7", "2024", ".", "!", "'s", "'ll", "(", ")", "\n", "\n", "\n\n",
                 " \n", "\n ", "\t", "\n\t", "\r\n", "  ", "é", "日本", "🙂", "\u00a0", "\u2028", "\x0b", "\x0c",
                 "<|endoftext|>"]
    text = "".join(rng.choice(fragments) for _ in range(40_000))
    monkeypatch.setattr(prepare_module, "CHUNK_CHARS", 1)  # cut at (nearly) every cut it takes as safe
    pieces = list(split_text(text))
    assert "".join(pieces) == text and len(pieces) > 300
    tok = get_tokenizer("gpt2")
    whole = tok.encode(text)
    assert [t for piece in pieces for t in tok.encode(piece)] == whole
    naive = re.split(r"(?<=\n)", text)  # after every "\n": the tokens change, so the text tests the rule
    assert [t for piece in naive for t in tok.encode(piece)] != whole


def test_text_files_in_processes_equal_one_process(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_module, "CHUNK_CHARS", 3000)
    (tmp_path / "in").mkdir()
    texts = [corpus.text(40_000), "Ünïcödé café 日本語\n\nline two\n end", corpus.text(5_000)[::-1]]
    for i, text in enumerate(texts):
        (tmp_path / "in" / f"{i}.txt").write_text(text, encoding="utf-8")
    assert len(list(split_text(texts[0]))) > 5
    outs = [prepare(str(tmp_path / f"out{n}"), dataset="text", input=str(tmp_path / "in" / "*.txt"),
                    tokenizer="gpt2", shard_size=2000, num_proc=n) for n in (1, 2)]
    names = sorted(os.listdir(outs[0]))
    assert names == sorted(os.listdir(outs[1])) and len(names) > 4
    for name in names:
        with open(os.path.join(outs[0], name), "rb") as a, open(os.path.join(outs[1], name), "rb") as b:
            assert a.read() == b.read(), name
    tok = get_tokenizer("gpt2")
    for split, split_docs in zip(("train", "val"), split_documents(texts, 0.1)):
        expected = sum(([tok.eot] * bool(i) + tok.encode(doc) for i, doc in enumerate(split_docs)), [])
        files = sorted(f for f in names if f.startswith(split))
        np.testing.assert_array_equal(np.concatenate([read_shard(os.path.join(outs[1], f)) for f in files]), expected)
