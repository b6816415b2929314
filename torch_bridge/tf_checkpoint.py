"""Reads a TensorFlow checkpoint (the V2 tensor bundle that tf.train.Saver writes) with numpy alone.

PREFIX.index is a LevelDB-format table (uncompressed: TensorFlow's BundleWriter never compresses it) mapping each
variable name to a BundleEntryProto (dtype, shape, shard, offset, size); PREFIX.data-SSSSS-of-NNNNN hold the raw
little-endian tensors. The layout is TensorFlow's tensor_bundle.{proto,cc} and LevelDB's table format; the test
holds `read` equal to tf.train.load_checkpoint. Slices of partitioned variables and the data's CRC32C are not read.
"""
from __future__ import annotations

import glob
import os
import re
import struct

import numpy as np

from jaxgpt.errors import UserFileNotFoundError, UserValueError

TABLE_MAGIC = 0xDB4775248B80FB57  # the last 8 bytes of every LevelDB table
FOOTER_SIZE = 48  # two block handles, padded, then the magic
DTYPES = {1: np.float32, 2: np.float64, 3: np.int32, 9: np.int64, 19: np.float16}  # TensorFlow's DataType enum


def checkpoint_prefix(directory: str) -> str:
    """The checkpoint that DIR/checkpoint names (relative to DIR, as TensorFlow reads it; an absolute path that is
    gone is looked for in DIR: a moved directory), else DIR's one *.index."""
    state = os.path.join(directory, "checkpoint")
    if not os.path.isfile(state):
        indexes = glob.glob(os.path.join(glob.escape(directory), "*.index"))
        if len(indexes) != 1:
            raise UserFileNotFoundError(f"{state}: no such file, and {directory} holds {len(indexes)} *.index files, "
                                        "not one: no TensorFlow checkpoint to read")
        return indexes[0].removesuffix(".index")
    with open(state) as f:
        match = re.search(r'^model_checkpoint_path:\s*"(.*)"', f.read(), re.MULTILINE)
    if not match:
        raise UserValueError(f"{state}: names no model_checkpoint_path")
    named = os.path.join(directory, match[1])
    return named if os.path.isfile(named + ".index") else os.path.join(directory, os.path.basename(match[1]))


def read(prefix: str) -> dict[str, np.ndarray]:
    """{variable name: array} of the checkpoint PREFIX (its .index and .data-* files). The arrays map the data
    files (copy-on-write): nothing is read until used."""
    index, shards, out = prefix + ".index", {}, {}
    num_shards, variables = read_index(index)
    for name, (dtype, shape, shard, offset, size) in variables.items():
        if shard not in shards:
            data = f"{prefix}.data-{shard:05d}-of-{num_shards:05d}"
            if not os.path.isfile(data):
                raise UserFileNotFoundError(f"{data}: no such file (the checkpoint's data)")
            shards[shard] = np.memmap(data, np.uint8, mode="c") if os.path.getsize(data) else np.zeros(0, np.uint8)
        if offset + size > len(shards[shard]) or size != dtype.itemsize * int(np.prod(shape)):
            raise UserValueError(f"{index}: variable {name} does not fit its data file (truncated?)")
        out[name] = shards[shard][offset:offset + size].view(dtype).reshape(shape)
    return out


def read_index(index: str) -> tuple[int, dict[str, tuple]]:
    """(number of data shards, {variable name: (dtype, shape, shard, offset, size)}) of a checkpoint's index."""
    if not os.path.isfile(index):
        raise UserFileNotFoundError(f"{index}: no such file (the checkpoint's index)")
    with open(index, "rb") as f:
        table = f.read()
    try:
        entries = {key.decode(): fields(value) for key, value in table_entries(table, index)}
    except (IndexError, struct.error, UnicodeDecodeError) as e:
        raise UserValueError(f"{index}: not a readable TensorFlow checkpoint index ({e!r})") from None
    header = entries.pop("", {})  # BundleHeaderProto: 1 num_shards, 2 endianness (LITTLE is 0)
    if header.get(2, [0])[0] != 0:
        raise UserValueError(f"{index}: a big-endian checkpoint, which this reader does not read")
    out = {}
    for name, entry in entries.items():  # BundleEntryProto: 1 dtype, 2 shape, 3 shard, 4 offset, 5 size, 7 slices
        if 7 in entry:
            raise UserValueError(f"{index}: variable {name} is saved in slices (a partitioned variable)")
        if (dtype := entry.get(1, [0])[0]) not in DTYPES:
            raise UserValueError(f"{index}: variable {name} has TensorFlow dtype {dtype}; this reader reads "
                                 f"{', '.join(np.dtype(t).name for t in DTYPES.values())}")
        shape = [fields(dim).get(1, [0])[0] for dim in fields(entry.get(2, [b""])[0]).get(2, [])]  # TensorShapeProto
        out[name] = (np.dtype(DTYPES[dtype]).newbyteorder("<"), shape,
                     *(entry.get(number, [0])[0] for number in (3, 4, 5)))
    return header.get(1, [1])[0], out


def table_entries(table: bytes, path: str):
    """(key, value) of every entry of a LevelDB table, in order: the footer names the index block, whose values
    are the handles of the data blocks."""
    if len(table) < FOOTER_SIZE or struct.unpack("<Q", table[-8:])[0] != TABLE_MAGIC:
        raise UserValueError(f"{path}: not a TensorFlow checkpoint index (no LevelDB table footer)")
    footer = table[-FOOTER_SIZE:]
    _, pos = varint(footer, varint(footer, 0)[1])  # skip the metaindex handle
    index_offset, pos = varint(footer, pos)
    index_size, _ = varint(footer, pos)
    for _, handle in block_entries(table, index_offset, index_size, path):
        offset, pos = varint(handle, 0)
        yield from block_entries(table, offset, varint(handle, pos)[0], path)


def block_entries(table: bytes, offset: int, size: int, path: str):
    """A block's entries: keys share a prefix with the previous one; a restart array and a count end the block,
    a 5-byte trailer (compression type, CRC) follows it."""
    if table[offset + size] != 0:
        raise UserValueError(f"{path}: a compressed block, which TensorFlow's checkpoints never have")
    block = table[offset:offset + size]
    end = size - 4 - 4 * struct.unpack("<I", block[-4:])[0]
    pos, key = 0, b""
    while pos < end:
        shared, pos = varint(block, pos)
        unshared, pos = varint(block, pos)
        length, pos = varint(block, pos)
        key = key[:shared] + block[pos:pos + unshared]
        yield key, block[pos + unshared:pos + unshared + length]
        pos += unshared + length


def varint(data: bytes, pos: int) -> tuple[int, int]:
    """(value, next position) of the base-128 varint at pos."""
    value = shift = 0
    while True:
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if byte < 0x80:
            return value, pos


def fields(message: bytes) -> dict[int, list]:
    """A protobuf message's fields by number: varints as ints, length-delimited ones as bytes, fixed as bytes."""
    out, pos = {}, 0
    while pos < len(message):
        tag, pos = varint(message, pos)
        kind = tag & 7
        if kind == 0:
            value, pos = varint(message, pos)
        elif kind == 2:
            length, pos = varint(message, pos)
            value, pos = message[pos:pos + length], pos + length
        elif kind in (1, 5):
            width = 8 if kind == 1 else 4
            value, pos = message[pos:pos + width], pos + width
        else:
            raise IndexError(f"protobuf wire type {kind}")
        out.setdefault(tag >> 3, []).append(value)
    return out
