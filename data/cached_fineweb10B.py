"""Download the GPT-2-tokenized FineWeb10B shards of the NanoGPT speedrun.

    python data/cached_fineweb10B.py           # the val shard and all 103 train shards (10.3B tokens)
    python data/cached_fineweb10B.py 8         # the val shard and the first 8 train shards (800M tokens)

Files come from the Hugging Face dataset repo kjj0/fineweb10B-gpt2 (the speedrun's own cache) into
data/fineweb10B/, named fineweb_val_000000.bin and fineweb_train_000001.bin ...: exactly what
train_gpt.py's default train_bin / val_bin globs match. Each shard holds 100M tokens (the last one
fewer) in the repo's shard format (256 int32 header, uint16 tokens), about 200 MB.

Re-running is cheap: a file whose header and size already agree (shards.read_shard) is skipped,
and an interrupted download resumes where it stopped (huggingface_hub keeps the partial file under
<out_dir>/.cache/huggingface/). huggingface_hub draws a progress bar per file.

The 145M runs need (steps x 393,216 tokens) / 100M train shards: 1770 steps -> 7 shards, 6200 steps
-> 25, 7080 steps -> 28 (TrainLoader samples random windows from every shard present, so more
shards only widen the pool).
"""

from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):  # run as a script (python data/X.py): the repo root makes `data` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data.shards import DataError, read_shard  # noqa: E402

REPO_ID = "kjj0/fineweb10B-gpt2"  # the speedrun's dataset repo (modded-nanogpt data/cached_fineweb10B.py)
REPO_TYPE = "dataset"
NUM_TRAIN_SHARDS = 103            # fineweb_train_000001.bin .. fineweb_train_000103.bin
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fineweb10B")


class DownloadError(RuntimeError):
    pass


def shard_names(n_train: int) -> list[str]:
    """The val shard first (every run needs it), then train shards 1..n_train."""
    if not 0 <= n_train <= NUM_TRAIN_SHARDS:
        raise DownloadError(f"asked for {n_train} train shards; the repo has 1 to {NUM_TRAIN_SHARDS} (0: only the val shard)")
    return ["fineweb_val_000000.bin"] + [f"fineweb_train_{i:06d}.bin" for i in range(1, n_train + 1)]


def is_complete(path: str) -> bool:
    """True when the file exists and its header's token count matches its size."""
    if not os.path.isfile(path):
        return False
    try:
        read_shard(path)
    except DataError:
        return False
    return True


def _explain(exc: Exception, name: str, repo_id: str, endpoint: str | None) -> str:
    """Turn a huggingface_hub / network exception into what went wrong and what to do."""
    from huggingface_hub import errors as hf_errors

    where = endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    first_line = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    if isinstance(exc, hf_errors.RepositoryNotFoundError):
        return (f"the dataset repo {repo_id} was not found at {where}. Check --repo_id (the speedrun's is {REPO_ID}) "
                "and HF_ENDPOINT; a private repo needs `hf auth login` or HF_TOKEN")
    if isinstance(exc, hf_errors.RemoteEntryNotFoundError):
        return f"{name} is not in {repo_id} at {where}. Ask for fewer shards (the repo has {NUM_TRAIN_SHARDS})"
    if isinstance(exc, hf_errors.HfHubHTTPError):
        return (f"the Hub at {where} refused {name} ({first_line}). Re-run later (downloads resume), "
                "or check HF_TOKEN if the error says unauthorized")
    if isinstance(exc, (hf_errors.LocalEntryNotFoundError, OSError)):  # no connection (the hub's own or the socket's)
        return (f"cannot reach {where} to fetch {name} ({type(exc).__name__}: {first_line}). "
                "Check the network or proxy (HTTPS_PROXY), HF_ENDPOINT and HF_HUB_OFFLINE, then re-run the same command: "
                "complete shards are kept and partial ones resume. Without network, copy the shards from another "
                "machine into the output directory")
    return f"{name}: {type(exc).__name__}: {exc}"


def download(n_train: int, out_dir: str = DEFAULT_OUT, repo_id: str = REPO_ID, endpoint: str | None = None,
             revision: str | None = None, download_fn=None, log=print) -> list[str]:
    """Fetch the val shard and the first n_train train shards into out_dir; return their paths.

    download_fn defaults to huggingface_hub.hf_hub_download (resumable, with progress bars)."""
    if download_fn is None:
        from huggingface_hub import hf_hub_download as download_fn
    names = shard_names(n_train)
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for i, name in enumerate(names, 1):
        path = os.path.join(out_dir, name)
        if is_complete(path):
            log(f"[{i}/{len(names)}] {name}: complete, skipped")
            paths.append(path)
            continue
        stale = os.path.exists(path)  # a truncated or corrupt file: fetch it again from scratch
        log(f"[{i}/{len(names)}] {name}: " + ("incomplete, downloading again" if stale else "downloading"))
        try:
            got = download_fn(repo_id=repo_id, filename=name, repo_type=REPO_TYPE, local_dir=out_dir,
                              revision=revision, endpoint=endpoint, force_download=stale)
        except Exception as e:  # the hub raises many types: classify, explain, stop
            raise DownloadError(_explain(e, name, repo_id, endpoint)) from e
        if os.path.abspath(got) != os.path.abspath(path):
            raise DownloadError(f"{name} was saved at {got}, not {path}; pass an --out_dir on a local disk")
        if not is_complete(path):
            raise DownloadError(f"{path} was downloaded but its header and size disagree: delete it and re-run")
        paths.append(path)
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("n_train", nargs="?", type=int, default=NUM_TRAIN_SHARDS,
                    help=f"train shards to fetch, 100M tokens each (default: all {NUM_TRAIN_SHARDS})")
    ap.add_argument("--out_dir", default=DEFAULT_OUT, help="where the shards go (default: data/fineweb10B)")
    ap.add_argument("--repo_id", default=REPO_ID, help="Hugging Face dataset repo holding the shards")
    ap.add_argument("--revision", default=None, help="branch, tag or commit of the repo (default: main)")
    ap.add_argument("--endpoint", default=None, help="Hub URL (default: $HF_ENDPOINT or https://huggingface.co)")
    args = ap.parse_args(argv)
    try:
        paths = download(args.n_train, args.out_dir, args.repo_id, args.endpoint, args.revision)
    except DownloadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    n_tok = sum(len(read_shard(p)) for p in paths[1:])
    print(f"{args.out_dir}: val shard + {len(paths) - 1} train shards ({n_tok / 1e9:.2f}B train tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
