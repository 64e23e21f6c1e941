"""Tokenize raw text with GPT-2's BPE (tiktoken) into the speedrun's shard format.

    python data/fineweb.py --input my_corpus/ --out_dir data/my_corpus          # .txt / .jsonl files
    python data/fineweb.py --input a.txt b.jsonl --val_tokens 1000000 --shard_tokens 10000000
    python data/fineweb.py --hf_dataset HuggingFaceFW/fineweb --hf_config sample-10BT \
        --out_dir data/fineweb10B_local                                         # needs `pip install datasets`

Every document starts with GPT-2's <|endoftext|> token (id 50256), so documents are separated by it.
A .txt file is one document; a .jsonl file holds one document per line in its "text" field; a
directory is searched recursively for both, in sorted order. The first --val_tokens tokens go to
<prefix>_val_000000.bin ..., the rest to <prefix>_train_000001.bin ..., each at most --shard_tokens
tokens (the speedrun's shards hold 10^8), written with shards.write_shard. Train on them with
    python train_gpt.py --train_bin 'OUT/<prefix>_train_*.bin' --val_bin 'OUT/<prefix>_val_*.bin'
(vocab_size 50304 = 50257 padded to a multiple of 128, train_gpt's default).

tiktoken downloads GPT-2's merge files once (set TIKTOKEN_CACHE_DIR to a folder holding them to work
offline).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Iterator

import numpy as np

if __package__ in (None, ""):  # run as a script (python data/X.py): the repo root makes `data` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data.shards import write_shard  # noqa: E402

EOT = 50256                 # GPT-2's <|endoftext|>
GPT2_VOCAB = 50257          # ids 0..50256; train_gpt pads the embedding to 50304
SHARD_TOKENS = 10**8        # the speedrun's shard size
TEXT_SUFFIXES = (".txt", ".jsonl")
BATCH_DOCS = 256            # documents handed to tiktoken per call


class CorpusError(ValueError):
    pass


def gpt2_encoding():
    try:
        import tiktoken
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # tiktoken raises requests/OS errors when it cannot fetch its files
        raise CorpusError(f"cannot load tiktoken's gpt2 encoding ({type(e).__name__}: {str(e)[:200]}). It is downloaded "
                          "on first use: connect to the network once, or set TIKTOKEN_CACHE_DIR to a folder holding "
                          "its cached files") from None


def list_inputs(inputs: list[str]) -> list[str]:
    """Files named directly, plus every .txt / .jsonl file under named directories (sorted)."""
    files = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(os.path.join(r, f) for r, _, fs in os.walk(item) for f in fs if f.endswith(TEXT_SUFFIXES))
            if not found:
                raise CorpusError(f"{item}: no {' or '.join(TEXT_SUFFIXES)} files in this directory")
            files += found
        elif os.path.isfile(item):
            files.append(item)
        else:
            raise CorpusError(f"{item}: no such file or directory")
    return files


def documents_from_files(files: list[str]) -> Iterator[str]:
    for path in files:
        if path.endswith(".jsonl"):
            with open(path, encoding="utf-8") as fh:
                for i, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        doc = json.loads(line)["text"]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise CorpusError(f"{path}:{i}: expected a JSON object with a 'text' field per line") from None
                    yield doc
        else:
            with open(path, encoding="utf-8", errors="replace") as fh:
                yield fh.read()


def documents_from_hf(name: str, config: str | None, split: str, text_field: str) -> Iterator[str]:
    try:
        import datasets  # optional: only this input needs it
    except ImportError:
        raise CorpusError("--hf_dataset needs the `datasets` package: pip install datasets "
                          "(or export the text to .txt / .jsonl files and pass --input)") from None
    for row in datasets.load_dataset(name, config, split=split, streaming=True):
        yield row[text_field]


def token_stream(docs: Iterable[str], enc, threads: int = 4) -> Iterator[np.ndarray]:
    """For each batch of documents: <|endoftext|> + tokens of each, concatenated, as uint16."""
    batch = []

    def flush():
        encoded = enc.encode_ordinary_batch(batch, num_threads=threads)
        return np.fromiter((t for doc in encoded for t in [EOT, *doc]), dtype=np.uint16)

    for doc in docs:
        batch.append(doc)
        if len(batch) == BATCH_DOCS:
            yield flush()
            batch = []
    if batch:
        yield flush()


class ShardWriter:
    """Cut a token stream into val shards (the first val_tokens) then train shards."""

    def __init__(self, out_dir: str, prefix: str, shard_tokens: int, val_tokens: int):
        if shard_tokens <= 0 or val_tokens <= 0:
            raise CorpusError(f"--shard_tokens ({shard_tokens}) and --val_tokens ({val_tokens}) must be > 0")
        self.out_dir, self.prefix, self.shard_tokens, self.val_left = out_dir, prefix, shard_tokens, val_tokens
        self.buf = np.empty(shard_tokens, dtype=np.uint16)
        self.fill, self.index, self.split = 0, 0, "val"
        self.paths: dict[str, list[str]] = {"val": [], "train": []}
        os.makedirs(out_dir, exist_ok=True)

    def _flush(self):
        if self.fill:
            path = os.path.join(self.out_dir, f"{self.prefix}_{self.split}_{self.index:06d}.bin")
            write_shard(path, self.buf[: self.fill])
            self.paths[self.split].append(path)
            self.index += 1
            self.fill = 0

    def add(self, toks: np.ndarray):
        while toks.size:
            room = self.shard_tokens - self.fill
            if self.split == "val":
                room = min(room, self.val_left)
            take = toks[:room]
            self.buf[self.fill: self.fill + take.size] = take
            self.fill += take.size
            toks = toks[take.size:]
            if self.split == "val":
                self.val_left -= take.size
                if self.val_left == 0:
                    self._flush()
                    self.split = "train"
                    continue
            if self.fill == self.shard_tokens:
                self._flush()

    def close(self) -> dict[str, list[str]]:
        self._flush()
        if not self.paths["train"]:
            raise CorpusError(f"the corpus ran out before any training tokens ({sum(1 for _ in self.paths['val'])} val "
                              f"shard(s) written, {self.val_left} val tokens still missing): lower --val_tokens")
        return self.paths


def tokenize(docs: Iterable[str], out_dir: str, prefix: str = "fineweb", shard_tokens: int = SHARD_TOKENS,
             val_tokens: int = SHARD_TOKENS, threads: int = 4, enc=None, progress=None) -> dict[str, list[str]]:
    enc = enc or gpt2_encoding()
    writer = ShardWriter(out_dir, prefix, shard_tokens, val_tokens)
    for toks in token_stream(docs, enc, threads):
        writer.add(toks)
        if progress is not None:
            progress.update(toks.size)
    return writer.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", nargs="+", help="text (.txt) or JSON-lines (.jsonl, 'text' field) files or directories")
    src.add_argument("--hf_dataset", help="a Hugging Face datasets name, streamed (needs `pip install datasets`)")
    ap.add_argument("--hf_config", default=None, help="dataset config, e.g. sample-10BT for HuggingFaceFW/fineweb")
    ap.add_argument("--hf_split", default="train")
    ap.add_argument("--text_field", default="text", help="column holding the text (--hf_dataset)")
    ap.add_argument("--out_dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "custom_gpt2"))
    ap.add_argument("--prefix", default="fineweb", help="file names <prefix>_{val,train}_NNNNNN.bin")
    ap.add_argument("--shard_tokens", type=int, default=SHARD_TOKENS, help="tokens per shard (speedrun: 10^8)")
    ap.add_argument("--val_tokens", type=int, default=SHARD_TOKENS, help="tokens for validation, taken first")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="tiktoken encoding threads")
    args = ap.parse_args(argv)
    try:
        docs = (documents_from_files(list_inputs(args.input)) if args.input
                else documents_from_hf(args.hf_dataset, args.hf_config, args.hf_split, args.text_field))
        from tqdm import tqdm
        with tqdm(unit="tok", unit_scale=True, desc="tokenizing") as bar:
            paths = tokenize(docs, args.out_dir, args.prefix, args.shard_tokens, args.val_tokens, args.threads, progress=bar)
    except CorpusError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    meta = {"tokenizer": "gpt2", "vocab_size": 50304, "eot": EOT, "val_shards": len(paths["val"]),
            "train_shards": len(paths["train"])}
    with open(os.path.join(args.out_dir, "meta.json"), "w") as fh:
        json.dump(meta, fh, indent=1)
    print(f"wrote {len(paths['val'])} val and {len(paths['train'])} train shards to {args.out_dir}\n"
          f"train with: --train_bin '{args.out_dir}/{args.prefix}_train_*.bin' --val_bin '{args.out_dir}/{args.prefix}_val_*.bin'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
