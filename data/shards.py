"""The token-shard format, numpy only: the data scripts write shards, train_gpt.py reads them.

A shard is the NanoGPT speedrun's .bin layout (modded-nanogpt's data/cached_fineweb10B.py files):
a header of HEADER_INTS int32 (SHARD_MAGIC, SHARD_VERSION, the token count, then zeros) followed by
the tokens as uint16. Everything imports it as `data.shards` (the data scripts, run as scripts, put
the repo root on sys.path first), so a process holds one DataError.
"""

import contextlib
import os

import numpy as np

SHARD_MAGIC, SHARD_VERSION, HEADER_INTS = 20240520, 1, 256
MAX_TOKEN_ID = 2**16 - 1          # uint16 tokens
RANGE_CHECK_CHUNK = 1 << 24       # tokens per max() in check_token_range: 32 MiB of uint16 at a time
TMP_TAG = ".tmp."                 # <path>.tmp.<pid>: a write in progress (or left by a killed process)


class DataError(ValueError):
    pass


def atomic_write(path: str, write) -> None:
    """write(fh) into <path>.tmp.<pid>, fsync, rename over path, fsync the directory: a kill at any
    moment leaves either the old file or the new one. A failed write (disk full) removes the
    temporary file and raises its OSError."""
    tmp = f"{path}{TMP_TAG}{os.getpid()}"
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    with contextlib.suppress(OSError):
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_shard(path: str, tokens) -> None:
    """Write tokens (any int array, ids <= MAX_TOKEN_ID) as a shard, atomically."""
    toks = np.asarray(tokens)
    if toks.size and (toks.min() < 0 or toks.max() > MAX_TOKEN_ID):
        raise DataError(f"{path}: token ids must be in [0, {MAX_TOKEN_ID}] for uint16 shards")
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:3] = SHARD_MAGIC, SHARD_VERSION, toks.size
    data = header.tobytes() + toks.astype(np.uint16).tobytes()
    atomic_write(path, lambda fh: fh.write(data))


def read_shard(path: str) -> np.ndarray:
    """Memory-map a shard's tokens after checking its header and length."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            raw = fh.read(HEADER_INTS * 4)
    except OSError as e:
        raise DataError(f"{path}: cannot read shard ({e})") from None
    if len(raw) < HEADER_INTS * 4:
        raise DataError(f"{path}: truncated shard header ({len(raw)} of {HEADER_INTS * 4} bytes)")
    header = np.frombuffer(raw, dtype=np.int32)
    if header[0] != SHARD_MAGIC:
        raise DataError(f"{path}: bad magic {header[0]} (expected {SHARD_MAGIC}): not a token shard")
    if header[1] != SHARD_VERSION:
        raise DataError(f"{path}: unsupported shard version {header[1]} (expected {SHARD_VERSION})")
    n = int(header[2])
    expected = HEADER_INTS * 4 + 2 * n
    if n < 0 or size != expected:
        raise DataError(f"{path}: header says {n} tokens ({expected} bytes) but the file has {size} bytes: truncated or corrupt; re-create it")
    if n == 0:
        return np.zeros(0, dtype=np.uint16)  # np.memmap refuses empty maps
    return np.memmap(path, dtype=np.uint16, mode="r", offset=HEADER_INTS * 4, shape=(n,))


def check_token_range(toks, vocab_size: int, where: str) -> None:
    """Refuse token ids >= vocab_size (an embedding lookup would fail deep inside torch); chunked,
    so a 100M-token shard needs bounded memory."""
    for lo in range(0, len(toks), RANGE_CHECK_CHUNK):
        top = int(toks[lo: lo + RANGE_CHECK_CHUNK].max())
        if top >= vocab_size:
            raise DataError(f"{where}: token id {top} >= vocab_size {vocab_size}; the data and the config disagree "
                            "(set vocab_size from the data's meta.json, or re-tokenize)")
