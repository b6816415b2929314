"""Token shards on disk (llm.c's format, and nanoGPT's raw train.bin/val.bin) and the grain pipeline that turns them
into endless training batches {"inputs", "targets"} of shape (batch_size, block_size). The order is one global stream
of windows, whatever the number of processes: a run resumes from the count of windows consumed, on any layout.
docs/architecture.md describes the shard format and the order of the batches."""
from __future__ import annotations

import glob
import hashlib
import os

import grain
import numpy as np

from jaxgpt.errors import UserFileNotFoundError, UserValueError

MAGIC = 20240520  # llm.c's token-shard magic number
VERSION = 1  # llm.c: version 1 = uint16 tokens
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
RAW_NAMES = ("train.bin", "val.bin")  # nanoGPT's headerless files
_CHECK_CHUNK = 1 << 24  # tokens per chunk when checking a whole shard against the vocabulary


def write_shard(path: str, tokens) -> str:
    """Writes tokens (ints in [0, 65535]) as an llm.c shard; the file appears only when complete."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"{path}: tokens must be 1-D, got shape {tokens.shape}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
        raise UserValueError(f"{path}: token ids must lie in [0, 65535] to be stored as uint16, "
                             f"got range [{tokens.min()}, {tokens.max()}]")
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:3] = MAGIC, VERSION, tokens.size
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype(np.uint16).tobytes())
    os.replace(tmp, path)
    return path


def read_shard(path: str, *, vocab_size: int | None = None) -> np.ndarray:
    """Memory-maps a shard (llm.c header or nanoGPT raw) as 1-D uint16; with vocab_size, checks every token."""
    size = os.path.getsize(path)
    head = np.fromfile(path, dtype=np.int32, count=min(HEADER_INTS, size // 4))
    if head.size and head[0] == MAGIC:
        offset, count = HEADER_BYTES, _check_header(path, head, size)
    elif os.path.basename(path) in RAW_NAMES and not _looks_like_header(head):
        if size % 2:
            raise UserValueError(f"{path}: a raw uint16 token file must have an even size, it has {size} bytes")
        offset, count = 0, size // 2
    else:
        found = int(head[0]) if head.size else None
        raise UserValueError(f"{path}: not a token shard: expected the llm.c header magic {MAGIC} at offset 0, found "
                             f"{found} (headerless uint16 files are read only under nanoGPT's names {RAW_NAMES})")
    tokens = (np.memmap(path, dtype=np.uint16, mode="r", offset=offset, shape=(count,)) if count
              else np.zeros(0, np.uint16))
    if vocab_size is not None:
        for start in range(0, count, _CHECK_CHUNK):
            check_tokens(tokens[start:start + _CHECK_CHUNK], vocab_size, path, start)
    return tokens


def check_tokens(tokens: np.ndarray, vocab_size: int, path: str, start: int = 0) -> None:
    """Raises naming the file and position when a token id is >= vocab_size (tokens = file[start:...])."""
    if tokens.size and tokens.max() >= vocab_size:
        pos = int(np.argmax(tokens >= vocab_size))
        raise UserValueError(f"{path}: token {int(tokens[pos])} at position {start + pos} is outside the "
                             f"vocabulary of {vocab_size} tokens (wrong tokenizer, or a corrupt file?)")


def _check_header(path: str, head: np.ndarray, size: int) -> int:
    """Validates an llm.c header; returns the token count."""
    if head.size < HEADER_INTS:
        raise UserValueError(f"{path}: truncated: {size} bytes, shorter than the {HEADER_BYTES}-byte llm.c header")
    if head[1] != VERSION:
        raise UserValueError(f"{path}: unsupported llm.c shard version {head[1]} (supported: {VERSION}, uint16 tokens)")
    count = int(head[2])
    expected = HEADER_BYTES + 2 * count
    if count < 0 or size != expected:
        what = "truncated" if size < expected else "corrupt"
        raise UserValueError(f"{path}: {what}: the header says {count} tokens ({expected} bytes), "
                             f"the file has {size} bytes")
    return count


def _looks_like_header(head: np.ndarray) -> bool:
    """A 256-int32 header padded with zeros (as llm.c writes) whose magic we did not recognise."""
    return head.size == HEADER_INTS and not head[3:].any()


def _split_patterns(split: str) -> tuple[str, ...]:
    return f"{split}.bin", f"{split}_*.bin", f"*_{split}.bin", f"*_{split}_*.bin"


def split_files(data_dir: str, split: str) -> list[str]:
    """The sorted shard files of a split ("train" or "val"): SPLIT.bin, SPLIT_*.bin, *_SPLIT.bin, *_SPLIT_*.bin."""
    return sorted({f for p in _split_patterns(split) for f in glob.glob(os.path.join(glob.escape(data_dir), p))})


def find_shards(data_dir: str, split: str) -> list[str]:
    """split_files, which must be there."""
    if not (files := split_files(data_dir, split)):
        raise UserFileNotFoundError(
            f"no {split!r} shards in {data_dir!r} (looked for {', '.join(_split_patterns(split))}); create them with "
            f"`python -m jaxgpt.prepare --dataset=tinyshakespeare --tokenizer=char --out={data_dir}` "
            f"(or --input=FILE, --dataset=stdlib_docs, --dataset=fineweb_edu --tokenizer=gpt2)")
    return files


def has_shards(data_dir: str) -> bool:
    """Whether data_dir holds both a train and a val split."""
    return bool(split_files(data_dir, "train") and split_files(data_dir, "val"))


class TokenWindows:
    """Random-access windows of `length` tokens over a list of shards; window ids 0..num_windows-1 per epoch."""

    def __init__(self, files: list[str], length: int, seed: int, vocab_size: int | None = None):
        if not files:
            raise ValueError("no shard files given")
        self.files, self.length, self.seed, self.vocab_size = list(files), length, seed, vocab_size
        self.tokens = [read_shard(f) for f in self.files]
        counts, self.slack = [], []
        for t in self.tokens:
            n = len(t) // length
            if n >= 2 and len(t) - n * length < length - 1:
                n -= 1  # keep a window's worth of slack so the per-epoch offset can shift by up to length - 1
            counts.append(n)
            self.slack.append(len(t) - n * length)
        self.first_window = np.cumsum([0] + counts)  # shard s holds window ids first_window[s]..[s+1]-1
        self.num_windows = int(self.first_window[-1])
        if not self.num_windows:
            raise UserValueError(f"the shards {self.files} hold {sum(map(len, self.tokens))} tokens: too few for one "
                                 f"window of block_size + 1 = {length} tokens")

    def locate(self, epoch: int, window_id: int) -> tuple[int, int]:
        """(shard, first token) of a window in an epoch."""
        shard = int(np.searchsorted(self.first_window, window_id, side="right")) - 1
        offset = _mix(self.seed, epoch, shard) % (self.slack[shard] + 1)
        return shard, offset + (window_id - int(self.first_window[shard])) * self.length

    def window(self, epoch: int, window_id: int) -> np.ndarray:
        shard, start = self.locate(epoch, window_id)
        tokens = self.tokens[shard][start:start + self.length]
        if self.vocab_size is not None:
            check_tokens(tokens, self.vocab_size, self.files[shard], start)
        return tokens.astype(np.int32)


def _batch_stream(files, *, block_size, batch_size, seed, process_index, process_count, vocab_size,
                  start: int = 0) -> grain.MapDataset:
    """This process's endless stream of batches, as a grain MapDataset (random access: batch i is ds[i]).

    Global micro-batch i is windows start + i*B .. start + (i+1)*B - 1 of the shuffled stream (B = batch_size x
    process_count), process p taking every process_count-th of them from the p-th: the windows a step sees depend
    only on `start` and B, not on how many processes share them."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must lie in [0, process_count={process_count})")
    if not 0 <= seed < 2**32:
        raise UserValueError(f"seed={seed} must lie in [0, 2**32) (grain's shuffle)")
    windows = TokenWindows(files, block_size + 1, seed, vocab_size)
    ds = window_ids(windows.num_windows, seed)
    ds = ds.map_with_index(lambda i, window_id: windows.window(i // windows.num_windows, window_id))
    if start < 0:
        raise ValueError(f"start={start} must be >= 0")
    ds = ds[start + process_index::process_count]
    # drop_remainder: the stream is endless anyway, and without it grain overflows computing the length of a
    # sys.maxsize-long stream in batches of 1.
    return ds.batch(batch_size, drop_remainder=True, batch_fn=_to_batch)


def window_ids(num_windows: int, seed: int) -> grain.MapDataset:
    """The endless stream of window ids, reshuffled every epoch (element e * num_windows + i: epoch e's i-th)."""
    return grain.MapDataset.range(num_windows).shuffle(seed=seed).repeat()


def _to_batch(windows: list[np.ndarray]) -> dict[str, np.ndarray]:
    tokens = np.stack(windows)  # (B, T + 1)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}  # (B, T) each


def make_dataset(files: list[str], *, block_size: int, batch_size: int, seed: int, process_index: int = 0,
                 process_count: int = 1, vocab_size: int | None = None, start: int = 0) -> grain.IterDataset:
    """Endless training batches of batch_size rows for this process, from global window `start` on (the windows
    every earlier batch consumed, summed over the processes)."""
    ds = _batch_stream(files, block_size=block_size, batch_size=batch_size, seed=seed, process_index=process_index,
                       process_count=process_count, vocab_size=vocab_size, start=start)
    # One background thread, a few batches ahead: reading a window is a memmap slice, more threads only contend
    # for the GIL, and a deep buffer of large batches would cost memory.
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=4))


def eval_batches(files: list[str], *, block_size: int, batch_size: int, n_batches: int, seed: int,
                 process_index: int = 0, process_count: int = 1,
                 vocab_size: int | None = None) -> list[dict[str, np.ndarray]]:
    """The same n_batches batches on every call (the start of the shuffled stream for `seed`)."""
    ds = _batch_stream(files, block_size=block_size, batch_size=batch_size, seed=seed, process_index=process_index,
                       process_count=process_count, vocab_size=vocab_size)
    return [ds[i] for i in range(n_batches)]


def stream_identity(files: list[str], *, block_size: int, seed: int) -> dict:
    """What fixes the window stream, kept with a checkpoint so that a resumed run can tell it reads the same one:
    the seed, the window length, each shard's name, size and a fingerprint of its first and last tokens (the
    directory may move between clusters; the data may not), and a fingerprint of the order the stream visits them."""
    shards = []
    for path in files:
        tokens = read_shard(path)
        digest = hashlib.sha256(np.asarray(tokens[:4096]).tobytes() + np.asarray(tokens[-4096:]).tobytes())
        shards.append([os.path.basename(path), int(tokens.size), digest.hexdigest()[:16]])
    return {"seed": int(seed), "window_tokens": block_size + 1, "shards": shards,
            "order": _order_fingerprint(TokenWindows(files, block_size + 1, seed), seed)}


def _order_fingerprint(windows: TokenWindows, seed: int, n: int = 32) -> str:
    """Where the first n windows of epochs 0 and 1 start: the order grain's shuffle and the per-epoch offsets give
    these shards. Another version of either would make a resumed run read other windows; this tells it."""
    ids, count = window_ids(windows.num_windows, seed), windows.num_windows
    places = [windows.locate(epoch, int(ids[epoch * count + i])) for epoch in (0, 1) for i in range(min(n, count))]
    return hashlib.sha256(repr(places).encode()).hexdigest()[:16]


def _mix(*values: int) -> int:
    """A deterministic 64-bit hash of small non-negative ints (splitmix64 steps)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ v) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h
