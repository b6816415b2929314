"""Your own byte-level BPE (Hugging Face tokenizers): exact round trips, better compression than characters, the
uint16 limit, prepared shards, an hf: stream, training and sampling on it, and a Hugging Face export."""
import os
import random

import corpus
import numpy as np
import pytest
import tokenizers
from test_prepare import documents, offline  # noqa: F401 -- offline: the autouse fixture, for the hf: test

from jaxgpt import data, prepare, tokenizer

TEXT = corpus.text(200_000)


@pytest.fixture(scope="module")
def bpe():
    return tokenizer.train_bpe([TEXT], 2048)


def random_text(rng: random.Random, n: int) -> str:
    """Any UTF-8: ASCII, whitespace runs, controls, accents, CJK, emoji (astral plane), the literal <|endoftext|>."""
    pieces = [chr(rng.randrange(32, 127)) for _ in range(20)] + [
        "\n", "\n\n", "\r\n", "\t", "   ", "\x00", "\x1b", "é", "ß", "日本", "🙂", "👩‍👩‍👧", "\u200b", "\ufffd",
        "<|endoftext|>",
        chr(rng.randrange(0x80, 0x800)), chr(rng.randrange(0x800, 0xD800)), chr(rng.randrange(0x10000, 0x10FFFF))]
    return "".join(rng.choice(pieces) for _ in range(n))


def test_any_utf8_round_trips_exactly(bpe):
    rng = random.Random(0)
    for n in (0, 1, 5, 50, 500):
        for _ in range(20):
            text = random_text(rng, n)
            ids = bpe.encode(text)
            assert bpe.decode(ids) == text and all(0 <= i < bpe.vocab_size for i in ids)
    assert bpe.encode("<|endoftext|>") != [bpe.eot]  # text, not the special token


def test_bpe_compresses_the_char_corpus_better_than_characters(bpe):
    held_out = corpus.text(260_000)[200_000:]  # past the BPE's training text (unless this Python's corpus repeats)
    char = tokenizer.CharTokenizer.from_text(TEXT + held_out)  # every character it is asked to encode
    n_bytes = len(held_out.encode("utf-8"))
    bpe_ratio, char_ratio = n_bytes / len(bpe.encode(held_out)), n_bytes / len(char.encode(held_out))
    print(f"\nbytes per token: bpe 2048 {bpe_ratio:.2f}, char ({char.vocab_size}) {char_ratio:.2f}")
    assert bpe.vocab_size == 2048 and bpe_ratio > 2 * char_ratio


def test_a_vocabulary_past_uint16_is_refused(tmp_path):
    (tmp_path / "t.txt").write_text(TEXT[:10_000])
    with pytest.raises(ValueError, match="shards store token ids as uint16, so at most 65536"):
        prepare.prepare(str(tmp_path / "out"), input=str(tmp_path / "t.txt"), tokenizer="bpe", vocab_size=70_000)
    with pytest.raises(ValueError, match="--tokenizer=bpe needs a --vocab_size"):
        prepare.prepare(str(tmp_path / "out"), input=str(tmp_path / "t.txt"), tokenizer="bpe")
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("bpe")
    (root / "t.txt").write_text(TEXT, encoding="utf-8")
    return prepare.prepare(str(root / "data"), input=str(root / "t.txt"), tokenizer="bpe", vocab_size=1024)


def test_prepare_trains_saves_and_tokenizes_with_it(bpe_dir):
    path = os.path.join(bpe_dir, tokenizer.TOKENIZER_FILE)
    hf = tokenizers.Tokenizer.from_file(path)  # the file is tokenizers' own
    tok = tokenizer.load_tokenizer(bpe_dir)
    assert isinstance(tok, tokenizer.BPETokenizer) and tok.vocab_size == hf.get_vocab_size() == 1024
    train, _ = prepare.split_documents([TEXT], 0.1)
    shard = data.read_shard(os.path.join(bpe_dir, "train_000000.bin"))
    assert np.array_equal(shard, tok.encode(train[0])) and tok.decode(shard) == train[0]
    assert hf.encode(train[0][:1000]).ids == tok.encode(train[0][:1000])


def test_hf_stream_trains_a_bpe_on_its_first_documents(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    docs = documents(300)
    pq.write_table(pa.table({"text": docs}), tmp_path / "docs.parquet")
    out = prepare.prepare(str(tmp_path / "out"), dataset=f"hf:{tmp_path / 'docs.parquet'}", tokenizer="bpe",
                          vocab_size=300, bpe_sample_chars=5_000, shard_size=1_000, num_proc=1)
    tok = tokenizer.load_tokenizer(out)
    assert isinstance(tok, tokenizer.BPETokenizer) and tok.vocab_size == 300
    names = ["val_000000.bin"] + sorted(n for n in os.listdir(out) if n.startswith("train_"))
    tokens = np.concatenate([data.read_shard(os.path.join(out, n)) for n in names])
    expected = np.concatenate([[tok.eot] + tok.encode(doc) for doc in docs])
    assert np.array_equal(tokens, expected)


def test_train_sample_and_export_use_it(bpe_dir, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")  # with torch: the dev install has both

    import torch_bridge
    from configs import tiny
    from jaxgpt import checkpoint, generate, sample, train
    config = tiny.get_config()
    config.update_from_flattened_dict({"data.dir": bpe_dir, "max_steps": 2, "eval_every": 2, "sample_tokens": 8,
                                       "optim.warmup_steps": 1, "sample_prompt": "Return the"})
    train.train(config, str(tmp_path / "w"))
    assert "data: " + bpe_dir + ", bpe tokenizer of 1024 tokens" in capsys.readouterr().out
    model = checkpoint.load_model(str(tmp_path / "w"))
    tok = sample.load_tokenizer("", model, str(tmp_path / "w"))  # the workdir's own
    assert isinstance(tok, tokenizer.BPETokenizer) and tok.vocab_size == 1024
    ids = generate.generate(model, [tok.encode("Return the")], max_new_tokens=8, temperature=0)[0]
    torch_bridge.save_hf(model, str(tmp_path / "hf"), tok)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    text = random_text(random.Random(1), 200).replace("<|endoftext|>", "")
    assert hf_tok.decode(hf_tok(text)["input_ids"]) == text and hf_tok(text)["input_ids"] == tok.encode(text)
    assert hf_tok.decode(ids) == tok.decode(ids)
