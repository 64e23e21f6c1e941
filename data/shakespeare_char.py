"""Tiny Shakespeare, character level, as train/val token shards plus meta.json.

    python data/shakespeare_char.py                      # download the exact file
    python data/shakespeare_char.py --input input.txt    # or use a local copy (no network)

Writes data/shakespeare_char/{train_000000.bin, val_000000.bin, meta.json}: the first 90% of the
characters for training, the last 10% for validation, in the speedrun's shard format. The file's
sha256 is checked so every user trains on the same 1,115,394 characters.
"""

import argparse
import hashlib
import json
import os
import sys
import urllib.request

if __package__ in (None, ""):  # run as a script (python data/X.py): the repo root makes `data` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data.shards import write_shard  # noqa: E402

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TRAIN_FRAC = 0.9


def fetch(url: str, timeout: float = 60.0) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.read()
    except OSError as e:
        raise SystemExit(f"error: cannot download {url} ({e}).\n"
                         "Without network, pass a local copy: python data/shakespeare_char.py --input /path/to/input.txt "
                         "(or SHAKESPEARE_TXT=/path/to/input.txt make train)")


def prepare(raw: bytes, out_dir: str, check_sha: bool = True) -> dict:
    digest = hashlib.sha256(raw).hexdigest()
    if check_sha and digest != SHA256:
        raise SystemExit(f"error: input has sha256 {digest}, expected {SHA256} (tiny Shakespeare, 1,115,394 chars); "
                         "pass --no_check to use another text on purpose")
    text = raw.decode("utf-8")
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = [stoi[c] for c in text]
    n_train = int(len(ids) * TRAIN_FRAC)
    os.makedirs(out_dir, exist_ok=True)
    write_shard(os.path.join(out_dir, "train_000000.bin"), ids[:n_train])
    write_shard(os.path.join(out_dir, "val_000000.bin"), ids[n_train:])
    meta = {"vocab_size": len(chars), "chars": chars, "sha256": digest, "n_train": n_train, "n_val": len(ids) - n_train,
            "tokenizer": "char"}
    with open(os.path.join(out_dir, "meta.json"), "w") as fh:
        json.dump(meta, fh, indent=1)
    return meta


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", default=os.environ.get("SHAKESPEARE_TXT", ""),
                    help="local input.txt instead of downloading (default: $SHAKESPEARE_TXT)")
    ap.add_argument("--url", default=URL, help="where to download from")
    ap.add_argument("--out_dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "shakespeare_char"))
    ap.add_argument("--no_check", action="store_true", help="skip the sha256 check (for other texts)")
    args = ap.parse_args(argv)
    if args.input:
        if not os.path.isfile(args.input):
            raise SystemExit(f"error: --input {args.input}: no such file")
        with open(args.input, "rb") as fh:
            raw = fh.read()
    else:
        raw = fetch(args.url)
    meta = prepare(raw, args.out_dir, check_sha=not args.no_check)
    print(f"wrote {args.out_dir}: vocab {meta['vocab_size']}, {meta['n_train']:,} train and {meta['n_val']:,} val tokens")


if __name__ == "__main__":
    main()
