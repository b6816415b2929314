"""Shard format, the grain loader (windows, determinism, process sharding, resuming from a window count) and
jaxgpt.prepare."""
import os
import subprocess
import sys

import corpus
import grain
import numpy as np
import pytest

from jaxgpt.data import (
    MAGIC,
    eval_batches,
    find_shards,
    has_shards,
    make_dataset,
    read_shard,
    stream_identity,
    write_shard,
)
from jaxgpt.prepare import prepare
from jaxgpt.tokenizer import get_tokenizer, load_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_numbered_shards(directory, sizes) -> tuple[list[str], list[np.ndarray]]:
    """Shard s holds s * 10000 + 0, 1, 2, ...: every token says where it came from."""
    tokens = [s * 10000 + np.arange(n) for s, n in enumerate(sizes)]
    files = [write_shard(str(directory / f"train_{s:06d}.bin"), t) for s, t in enumerate(tokens)]
    return files, tokens


def window_starts(batches, tokens) -> list[tuple[int, int]]:
    """(shard, start) of every row; asserts each row is a contiguous window and targets are inputs shifted."""
    starts = []
    for batch in batches:
        assert batch["inputs"].dtype == np.int32 and batch["targets"].dtype == np.int32
        for inputs, targets in zip(batch["inputs"], batch["targets"]):
            shard, start = divmod(int(inputs[0]), 10000)
            block = len(inputs)
            np.testing.assert_array_equal(inputs, tokens[shard][start:start + block])
            np.testing.assert_array_equal(targets, tokens[shard][start + 1:start + block + 1])
            starts.append((shard, start))
    return starts


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["inputs"], y["inputs"])
        np.testing.assert_array_equal(x["targets"], y["targets"])


# --- shard files ---------------------------------------------------------------------------------------------

def test_llmc_shard_round_trip(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 50257, size=1234)
    path = write_shard(str(tmp_path / "train_000000.bin"), tokens)
    assert os.path.getsize(path) == 1024 + 2 * 1234
    header = np.fromfile(path, dtype=np.int32, count=256)
    assert list(header[:3]) == [20240520, 1, 1234] and not header[3:].any()
    read = read_shard(path, vocab_size=50257)
    assert isinstance(read, np.memmap) and read.dtype == np.uint16
    np.testing.assert_array_equal(read, tokens)


def test_nanogpt_raw_round_trip(tmp_path):
    tokens = np.random.default_rng(1).integers(0, 65, size=999)
    path = str(tmp_path / "val.bin")
    tokens.astype(np.uint16).tofile(path)  # exactly how nanoGPT's prepare.py writes val.bin
    np.testing.assert_array_equal(read_shard(path, vocab_size=65), tokens)
    assert find_shards(str(tmp_path), "val") == [path]


def test_corrupt_shards_raise_naming_the_file(tmp_path):
    good = np.arange(100)
    wrong_magic = write_shard(str(tmp_path / "train_000000.bin"), good)
    with open(wrong_magic, "r+b") as f:
        f.write(np.int32(20240326).tobytes())  # llm.c's *model* file magic
    with pytest.raises(ValueError, match=f"{wrong_magic}: not a token shard.*{MAGIC}.*20240326"):
        read_shard(wrong_magic)

    raw_looking = str(tmp_path / "train.bin")  # nanoGPT's name, but a zero-padded header with a bad magic
    os.replace(wrong_magic, raw_looking)
    with pytest.raises(ValueError, match=f"{raw_looking}: not a token shard"):
        read_shard(raw_looking)

    wrong_version = write_shard(str(tmp_path / "val_000000.bin"), good)
    with open(wrong_version, "r+b") as f:
        f.seek(4)
        f.write(np.int32(2).tobytes())
    with pytest.raises(ValueError, match=f"{wrong_version}: unsupported llm.c shard version 2"):
        read_shard(wrong_version)

    truncated = write_shard(str(tmp_path / "val_000001.bin"), good)
    os.truncate(truncated, 1024 + 2 * 60)
    with pytest.raises(ValueError, match=f"{truncated}: truncated: the header says 100 tokens"):
        read_shard(truncated)

    in_vocab = np.arange(100) % 65
    out_of_vocab = write_shard(str(tmp_path / "val_000002.bin"), np.r_[in_vocab, 70, in_vocab])
    with pytest.raises(ValueError, match=f"{out_of_vocab}: token 70 at position 100 is outside .* 65 tokens"):
        read_shard(out_of_vocab, vocab_size=65)
    data = iter(make_dataset([out_of_vocab], block_size=200, batch_size=1, seed=0, vocab_size=65))
    with pytest.raises(ValueError, match=f"{out_of_vocab}: token 70 at position 100"):
        next(data)  # the loader checks every window it reads

    with pytest.raises(ValueError, match="must lie in \\[0, 65535\\]"):
        write_shard(str(tmp_path / "x.bin"), [1, 70000])


def test_find_shards(tmp_path):
    names = ["train_000001.bin", "train_000000.bin", "fineweb_train_000002.bin", "val_000000.bin", "interval.bin"]
    for name in names:
        write_shard(str(tmp_path / name), [1, 2, 3])
    assert [os.path.basename(f) for f in find_shards(str(tmp_path), "train")] == [
        "fineweb_train_000002.bin", "train_000000.bin", "train_000001.bin"]
    assert [os.path.basename(f) for f in find_shards(str(tmp_path), "val")] == ["val_000000.bin"]
    with pytest.raises(FileNotFoundError, match=f"no 'val' shards in '{tmp_path / 'empty'}'.*python -m jaxgpt.prepare"):
        find_shards(str(tmp_path / "empty"), "val")


# --- the loader ----------------------------------------------------------------------------------------------

def test_batches_are_shifted_windows_covering_an_epoch_once(tmp_path):
    files, tokens = write_numbered_shards(tmp_path, [2000, 1500, 700])
    block, batch = 31, 4  # windows of 32 tokens
    ds = make_dataset(files, block_size=block, batch_size=batch, seed=3)
    num_windows = 61 + 45 + 20  # n // 32, less one where that leaves under 31 tokens of slack for the random offset
    starts = window_starts(take(iter(ds), num_windows // batch), tokens)
    assert len(set(starts)) == len(starts)
    for shard in range(3):  # within an epoch the windows of a shard do not overlap
        ordered = sorted(s for sh, s in starts if sh == shard)
        assert all(b - a >= 32 for a, b in zip(ordered, ordered[1:]))
    assert {sh for sh, _ in starts} == {0, 1, 2}


def test_deterministic_for_a_seed_and_infinite(tmp_path):
    files, tokens = write_numbered_shards(tmp_path, [3000])
    make = lambda seed: iter(make_dataset(files, block_size=16, batch_size=8, seed=seed))
    first = take(make(7), 60)  # 480 windows: several epochs of the 175 windows
    assert_same_batches(first, take(make(7), 60))
    assert not np.array_equal(first[0]["inputs"], take(make(8), 1)[0]["inputs"])
    starts = window_starts(first, tokens)
    offsets = {start % 17 for _, start in starts}
    assert len(offsets) > 1  # every epoch cuts the windows at a new offset


def test_processes_read_disjoint_windows(tmp_path):
    files, tokens = write_numbered_shards(tmp_path, [1600, 1600])
    per_process = []
    for index in range(2):
        ds = make_dataset(files, block_size=15, batch_size=4, seed=0, process_index=index, process_count=2)
        per_process.append(set(window_starts(take(iter(ds), 12), tokens)))  # 48 of the 99 windows each per epoch
    assert len(per_process[0]) == len(per_process[1]) == 48
    assert not per_process[0] & per_process[1]
    with pytest.raises(ValueError, match="process_index=2 must lie in"):
        make_dataset(files, block_size=15, batch_size=4, seed=0, process_index=2, process_count=2)


def test_start_continues_the_stream_exactly(tmp_path):
    """A run resumes from the count of windows consumed: the stream from `start` is the stream after that many."""
    files, _ = write_numbered_shards(tmp_path, [900, 400])
    make = lambda start: iter(make_dataset(files, block_size=20, batch_size=3, seed=11, start=start))
    whole = take(make(0), 34)  # past the first epoch of 41 + 18 windows
    assert_same_batches(take(make(25 * 3), 9), whole[25:])
    with pytest.raises(ValueError, match="start=-3 must be >= 0"):
        make(-3)


@pytest.mark.parametrize("processes", [2, 4])
def test_a_global_batch_holds_the_same_windows_whatever_the_process_count(tmp_path, processes):
    """Global micro-batch i is windows start + i*B .. start + (i+1)*B - 1 of the one shuffled stream, however many
    processes share it: a run resumed on another number of processes draws what the uninterrupted one would."""
    files, tokens = write_numbered_shards(tmp_path, [1600, 700])
    start, global_batch = 30, 8
    one = take(iter(make_dataset(files, block_size=15, batch_size=global_batch, seed=3, start=start)), 20)
    parts = [take(iter(make_dataset(files, block_size=15, batch_size=global_batch // processes, seed=3, start=start,
                                    process_index=p, process_count=processes)), 20) for p in range(processes)]
    for i in range(20):  # 160 windows: into the second epoch of 143
        expected = sorted(window_starts([one[i]], tokens))
        assert sorted(s for part in parts for s in window_starts([part[i]], tokens)) == expected


def test_eval_batches_are_fixed(tmp_path):
    files, tokens = write_numbered_shards(tmp_path, [5000])
    kwargs = dict(block_size=32, batch_size=5, n_batches=3)
    batches = eval_batches(files, seed=1, **kwargs)
    assert len(batches) == 3 and batches[0]["inputs"].shape == (5, 32)
    window_starts(batches, tokens)
    assert_same_batches(batches, eval_batches(files, seed=1, **kwargs))
    assert not np.array_equal(batches[0]["inputs"], eval_batches(files, seed=2, **kwargs)[0]["inputs"])
    # the start of the shuffled stream for the seed: the first batches a training run with that seed would draw
    assert_same_batches(batches, take(iter(make_dataset(files, block_size=32, batch_size=5, seed=1)), 3))


def test_too_little_data_is_a_clear_error(tmp_path):
    files, _ = write_numbered_shards(tmp_path, [10])
    with pytest.raises(ValueError, match="too few for one window of block_size \\+ 1 = 65 tokens"):
        make_dataset(files, block_size=64, batch_size=1, seed=0)


def test_shard_edges_token_range_vocabulary_and_sizes(tmp_path):
    """The edges of the shard format (docs/architecture.md, "Data"): uint16 tokens are 0..65535, an empty shard is a
    bare header, a token id equal to the vocabulary size is outside it, a raw file is whole uint16s, a headerless
    file is read only under nanoGPT's names, and a file shorter or longer than its header says is refused."""
    edges = read_shard(write_shard(str(tmp_path / "train_000000.bin"), [0, 65535]))
    assert edges.tolist() == [0, 65535] and not edges.flags.writeable  # memory-mapped read-only: data is not written
    for bad in ([65536], [-1]):
        with pytest.raises(ValueError, match="must lie in \\[0, 65535\\]"):
            write_shard(str(tmp_path / "x.bin"), bad)
    with pytest.raises(ValueError, match="tokens must be 1-D, got shape \\(2, 3\\)"):
        write_shard(str(tmp_path / "x.bin"), np.zeros((2, 3), int))  # a stream of tokens, not a batch
    empty = write_shard(str(tmp_path / "train_000001.bin"), [])
    assert os.path.getsize(empty) == 1024 and read_shard(empty, vocab_size=65).size == 0

    at_vocab = write_shard(str(tmp_path / "val_000000.bin"), [1, 2, 65, 3])
    with pytest.raises(ValueError, match=f"{at_vocab}: token 65 at position 2 is outside .* 65 tokens"):
        read_shard(at_vocab, vocab_size=65)
    read_shard(at_vocab, vocab_size=66)
    data = iter(make_dataset([at_vocab], block_size=3, batch_size=1, seed=0, vocab_size=65))
    with pytest.raises(ValueError, match=f"{at_vocab}: token 65 at position 2"):
        next(data)
    first = write_shard(str(tmp_path / "val_000003.bin"), [70, 1, 2])
    with pytest.raises(ValueError, match=f"{first}: token 70 at position 0"):
        read_shard(first, vocab_size=65)

    odd = tmp_path / "val.bin"
    odd.write_bytes(b"\x01\x00\x02\x00\x03\x00\x04\x00\x05")
    with pytest.raises(ValueError, match=f"{odd}: a raw uint16 token file must have an even size, it has 9 bytes"):
        read_shard(str(odd))
    headerless = tmp_path / "train_000002.bin"  # nanoGPT's raw tokens under llm.c's name
    np.arange(1, 700, dtype=np.uint16).tofile(headerless)
    with pytest.raises(ValueError, match=f"{headerless}: not a token shard: .* found {1 + (2 << 16)}"):
        read_shard(str(headerless))
    nothing = tmp_path / "train_000003.bin"
    nothing.write_bytes(b"")
    with pytest.raises(ValueError, match=f"{nothing}: not a token shard: .* found None"):
        read_shard(str(nothing))
    raw = np.zeros(600, np.uint16)
    raw[6] = 5  # the fourth int32 of what would be a header is not zero: tokens, not an llm.c header
    raw.tofile(tmp_path / "train.bin")
    np.testing.assert_array_equal(read_shard(str(tmp_path / "train.bin")), raw)

    short = tmp_path / "val_000001.bin"
    np.array([MAGIC, 1, 3, 0, 0], np.int32).tofile(short)
    with pytest.raises(ValueError, match=f"{short}: truncated: 20 bytes, shorter than the 1024-byte llm.c header"):
        read_shard(str(short))
    long = write_shard(str(tmp_path / "val_000002.bin"), np.arange(100))
    with open(long, "ab") as f:
        f.write(b"\x00\x00")
    with pytest.raises(ValueError, match=f"{long}: corrupt: the header says 100 tokens \\(1224 bytes\\), the file has "
                                         "1226 bytes"):
        read_shard(long)


def windows_per_epoch(size: int, length: int) -> int:
    """The windows of `length` tokens a shard of `size` tokens gives every epoch: as many as fit after an offset of
    up to length - 1 tokens, and one window when only one fits at all."""
    return max((size - (length - 1)) // length, 1 if size >= length else 0)


def test_each_epoch_cuts_every_shard_at_one_offset_that_changes_per_epoch(tmp_path):
    """Every epoch cuts each shard into consecutive windows of block_size + 1 tokens starting at a random offset (a
    new one per epoch and shard) and visits all windows of all shards once (docs/architecture.md, "Data"); over the
    epochs the cuts fall at every position of a window."""
    length = 8
    sizes = [length, length + 3, 2 * length + 3, 3 * length - 1, 5 * length + 1]
    per_shard = [windows_per_epoch(n, length) for n in sizes]
    assert per_shard == [1, 1, 1, 2, 4]
    files, tokens = write_numbered_shards(tmp_path, sizes)
    per_epoch = sum(per_shard)
    data = iter(make_dataset(files, block_size=length - 1, batch_size=per_epoch, seed=5))
    offsets = [set() for _ in sizes]
    for _ in range(60):  # one batch is one epoch
        starts = window_starts([next(data)], tokens)
        for shard, size in enumerate(sizes):
            mine = sorted(start for sh, start in starts if sh == shard)
            assert len(mine) == per_shard[shard]
            first = mine[0]
            assert mine == [first + k * length for k in range(len(mine))] and first + len(mine) * length <= size
            offsets[shard].add(first)
    assert offsets[0] == {0} and offsets[1] == {0, 1, 2, 3}  # a shard of one window: every offset that fits
    for shard in (2, 3, 4):
        assert {o % length for o in offsets[shard]} == set(range(length))


def test_the_seed_orders_the_windows(tmp_path):
    """The seed shuffles the order in which an epoch visits the windows, not only where they are cut."""
    files, tokens = write_numbered_shards(tmp_path, [400, 300])

    def order(seed):  # (shard, window number within the shard) in the order of the first epoch
        starts = window_starts(take(iter(make_dataset(files, block_size=15, batch_size=1, seed=seed)), 42), tokens)
        return [(sh, sorted(s for h, s in starts if h == sh).index(start)) for sh, start in starts]

    one, two = order(1), order(2)
    assert sorted(one) == sorted(two) and one != two and one != sorted(one)


def test_the_seed_is_a_32_bit_unsigned_int(tmp_path):
    files, _ = write_numbered_shards(tmp_path, [400])
    next(iter(make_dataset(files, block_size=15, batch_size=2, seed=2**32 - 1)))
    for seed in (2**32, -1):
        with pytest.raises(ValueError, match=f"seed={seed} must lie in \\[0, 2\\*\\*32\\)"):
            make_dataset(files, block_size=15, batch_size=2, seed=seed)


def test_stream_identity_names_seed_window_and_each_shard_by_name_size_and_its_ends(tmp_path):
    """What a checkpoint keeps of the stream (docs/architecture.md, "Data"): the seed, the window length, and each
    shard's name, size and a fingerprint of its first and last tokens; the directory may move, the data may not."""
    tokens = np.random.default_rng(0).integers(0, 50257, size=20000)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()

    def identity(directory, shard, seed=3, block_size=63):
        path = write_shard(str(tmp_path / directory / "train_000000.bin"), shard)
        other = write_shard(str(tmp_path / directory / "train_000001.bin"), tokens[:5000])
        return stream_identity([path, other], block_size=block_size, seed=seed)

    base = identity("a", tokens)
    assert base["seed"] == 3 and base["window_tokens"] == 64
    assert [s[:2] for s in base["shards"]] == [["train_000000.bin", 20000], ["train_000001.bin", 5000]]
    assert base["shards"][0][2] != base["shards"][1][2]
    assert identity("b", tokens) == base  # moved
    assert identity("a", tokens, seed=4)["seed"] == 4 and identity("a", tokens, block_size=31)["window_tokens"] == 32
    middle = tokens.copy()
    middle[10000] += 1
    assert identity("a", middle) == base  # only the ends are read: a fingerprint, not a checksum of every token
    for position in (0, -1):
        changed = tokens.copy()
        changed[position] += 1
        assert identity("a", changed)["shards"][0][2] != base["shards"][0][2]
    longer = identity("a", np.r_[tokens, tokens[-1]])["shards"][0]
    assert longer[1] == 20001 and longer[2] != base["shards"][0][2]


def test_a_data_directory_needs_both_splits_and_a_loader_needs_a_shard(tmp_path):
    assert not has_shards(str(tmp_path))
    write_shard(str(tmp_path / "train_000000.bin"), np.arange(100))
    assert not has_shards(str(tmp_path))
    write_shard(str(tmp_path / "val_000000.bin"), np.arange(100))
    assert has_shards(str(tmp_path))
    with pytest.raises(ValueError, match="no shard files given"):
        make_dataset([], block_size=15, batch_size=2, seed=0)


# --- prepare -------------------------------------------------------------------------------------------------

def test_prepare_cli_on_a_text_file(tmp_path):
    text = "".join(f"Line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(400))
    (tmp_path / "input.txt").write_text(text)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "jaxgpt.prepare", f"--input={tmp_path / 'input.txt'}",
                             "--tokenizer=gpt2", f"--out={out}"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    tok = load_tokenizer(str(out))
    assert tok.name == "gpt2"
    cut = int(len(text) * 0.9)
    train, val = find_shards(str(out), "train"), find_shards(str(out), "val")
    np.testing.assert_array_equal(read_shard(train[0], vocab_size=tok.vocab_size), tok.encode(text[:cut]))
    np.testing.assert_array_equal(read_shard(val[0], vocab_size=tok.vocab_size), tok.encode(text[cut:]))
    batch = next(iter(make_dataset(train, block_size=32, batch_size=2, seed=0, vocab_size=tok.vocab_size)))
    assert batch["inputs"].shape == (2, 32)

    again = subprocess.run([sys.executable, "-m", "jaxgpt.prepare", f"--input={tmp_path / 'input.txt'}",
                            f"--out={out}"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert again.returncode == 1 and "already holds shards" in again.stderr and "--overwrite" in again.stderr


@pytest.mark.parametrize("tokenizer, train_tokens, val_tokens", [
    ("char", 1_003_854, 111_540),  # the counts nanoGPT's data/shakespeare_char/prepare.py reports
    ("gpt2", 301_966, 36_059),  # and data/shakespeare/prepare.py
])
def test_prepare_tinyshakespeare_matches_nanogpt(tmp_path, tokenizer, train_tokens, val_tokens):
    out = prepare(str(tmp_path / "out"), dataset="tinyshakespeare", input=corpus.tinyshakespeare(), tokenizer=tokenizer)
    assert len(read_shard(find_shards(out, "train")[0])) == train_tokens
    assert len(read_shard(find_shards(out, "val")[0])) == val_tokens
    assert load_tokenizer(out).vocab_size == (65 if tokenizer == "char" else 50257)


def test_prepare_rejects_wrong_inputs(tmp_path):
    (tmp_path / "other.txt").write_text("not shakespeare")
    with pytest.raises(RuntimeError, match="not tinyshakespeare"):
        prepare(str(tmp_path / "a"), dataset="tinyshakespeare", input=str(tmp_path / "other.txt"))
    with pytest.raises(FileNotFoundError, match="no such text file"):
        prepare(str(tmp_path / "b"), dataset="text", input=str(tmp_path / "missing*.txt"))
    with pytest.raises(ValueError, match="unknown dataset 'openwebtext'"):
        prepare(str(tmp_path / "c"), dataset="openwebtext")
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")


def test_prepare_several_files_separates_documents(tmp_path):
    for name, text in [("a.txt", "alpha " * 50), ("b.txt", "beta " * 50), ("c.txt", "gamma " * 50)]:
        (tmp_path / name).write_text(text)
    out = prepare(str(tmp_path / "out"), dataset="auto", input=str(tmp_path / "*.txt"), tokenizer="gpt2",
                  val_fraction=0.5)
    tok = get_tokenizer("gpt2")
    train = read_shard(find_shards(out, "train")[0])
    val = read_shard(find_shards(out, "val")[0])
    # 300 + 250 + 300 characters, cut at 425: inside b.txt, after its first 125 characters
    assert tok.decode(train) == "alpha " * 50 + "<|endoftext|>" + ("beta " * 50)[:125]
    assert tok.decode(val) == ("beta " * 50)[125:] + "<|endoftext|>" + "gamma " * 50


def test_stdlib_docs_corpus(tmp_path):
    first = prepare(str(tmp_path / "a"), dataset="stdlib_docs", tokenizer="gpt2")
    text = "".join(get_tokenizer("gpt2").decode(read_shard(f)) for f in find_shards(first, "train"))
    assert len(text) > 100_000
    import json

    assert json.dumps.__doc__.strip().splitlines()[0] in text  # a docstring of the running interpreter
    second = prepare(str(tmp_path / "b"), dataset="stdlib_docs", tokenizer="gpt2")
    for split in ("train", "val"):  # the same corpus on every run
        [a], [b] = find_shards(first, split), find_shards(second, split)
        np.testing.assert_array_equal(read_shard(a), read_shard(b))


def test_interrupted_prepare_leaves_nothing_that_looks_prepared(tmp_path, monkeypatch):
    """A preparation that dies after its train shards leaves no out_dir (a new one) or the old contents (an
    existing one), and nothing beside them; a complete one then succeeds in the same place."""
    from jaxgpt import prepare as prepare_module
    text = corpus.write(tmp_path / "input.txt", 20_000)
    real = prepare_module._write_split

    def dies_at_val(out_dir, split, tokens, shard_size):
        if split == "val":
            raise KeyboardInterrupt
        real(out_dir, split, tokens, shard_size)
    monkeypatch.setattr(prepare_module, "_write_split", dies_at_val)
    (tmp_path / "existing").mkdir()
    for out in (tmp_path / "new", tmp_path / "existing"):
        with pytest.raises(KeyboardInterrupt):
            prepare(str(out), dataset="text", input=text)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing", "input.txt"]
    assert list((tmp_path / "existing").iterdir()) == []
    monkeypatch.setattr(prepare_module, "_write_split", real)
    for out in (tmp_path / "new", tmp_path / "existing"):
        prepare(str(out), dataset="text", input=text)
        assert len(find_shards(str(out), "val")) == 1 and load_tokenizer(str(out)).vocab_size > 10


def test_the_order_fingerprint_follows_the_shuffle_and_the_offsets(tmp_path, monkeypatch):
    """A resumed run must read the windows the interrupted one would have: stream_identity fingerprints the order
    (grain's shuffle, the per-epoch offsets), so a version that orders the same shards otherwise is told apart."""
    from jaxgpt import data
    files, _ = write_numbered_shards(tmp_path, [3000, 1200])
    base = stream_identity(files, block_size=31, seed=5)["order"]
    assert stream_identity(files, block_size=31, seed=5)["order"] == base
    assert stream_identity(files, block_size=31, seed=6)["order"] != base
    with monkeypatch.context() as m:  # other per-epoch offsets
        m.setattr(data, "_mix", lambda *values: sum(values) * 7)
        assert stream_identity(files, block_size=31, seed=5)["order"] != base
    with monkeypatch.context() as m:  # another shuffle
        m.setattr(data, "window_ids", lambda n, seed: grain.MapDataset.range(n).repeat())
        assert stream_identity(files, block_size=31, seed=5)["order"] != base
