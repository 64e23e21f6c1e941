"""Generate text from a checkpoint of train_gpt.py.

    python scripts/sample.py logs/RUN/ckpt_final.pt --prompt "ROMEO:" --num_tokens 500
    python scripts/sample.py logs/RUN/ckpt_final.pt --prompt "The meaning of" --temperature 0.8 --top_k 50
    python scripts/sample.py CKPT --temperature 0          # greedy decoding

The tokenizer follows the checkpoint: a char-level model (Shakespeare) decodes with the meta.json
that sits next to the shards its config's train_bin points at (override with --meta); a model
with vocab_size 50304 (or a meta.json saying "gpt2") uses tiktoken's GPT-2 encoding. The context
is cropped to the model's seq_len (its RoPE tables end there).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from train_gpt import CheckpointError, model_from_checkpoint  # noqa: E402

GPT2_PADDED_VOCAB = 50304  # train_gpt's default: GPT-2's 50257 padded to a multiple of 128
GPT2_EOT = 50256


class SampleError(ValueError):
    pass


class CharTokenizer:
    def __init__(self, chars: list[str], source: str):
        self.chars, self.source = chars, source
        self.stoi = {c: i for i, c in enumerate(chars)}

    def encode(self, text: str) -> list[int]:
        missing = sorted(set(text) - set(self.stoi))
        if missing:
            raise SampleError(f"prompt characters {missing!r} are not in the vocabulary of {self.source}; "
                              "use only characters of the training text")
        return [self.stoi[c] for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def start(self) -> list[int]:
        """What to condition on when the prompt is empty: a newline if the vocabulary has one."""
        return [self.stoi.get("\n", 0)]


class GPT2Tokenizer:
    def __init__(self):
        import tiktoken
        self.enc = tiktoken.get_encoding("gpt2")

    def encode(self, text: str) -> list[int]:
        return self.enc.encode(text, allowed_special={"<|endoftext|>"})

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode([i for i in ids if i < self.enc.n_vocab])  # ids of the padding never decode

    def start(self) -> list[int]:
        return [GPT2_EOT]


def resolve_path(path: str, base_dirs: list[str]) -> str:
    """A relative path as given, else relative to each of base_dirs (cwd of training is unknown)."""
    if os.path.isabs(path):
        return path
    for b in ["."] + base_dirs:
        cand = os.path.join(b, path)
        if glob.glob(cand):
            return cand
    return path


def find_meta(train_bin: str, ckpt_path: str) -> str | None:
    d = os.path.dirname(resolve_path(os.path.join(os.path.dirname(train_bin), "meta.json"), [REPO, os.path.dirname(ckpt_path)]))
    cand = os.path.join(d, "meta.json")
    return cand if os.path.isfile(cand) else None


def tokenizer_for(cfg, ckpt_path: str, meta_path: str | None):
    meta_path = meta_path or find_meta(cfg.train_bin, ckpt_path)
    meta = None
    if meta_path:
        if not os.path.isfile(meta_path):
            raise SampleError(f"--meta {meta_path}: no such file")
        with open(meta_path) as fh:
            meta = json.load(fh)
    if meta is not None and meta.get("tokenizer", "char") == "char" and "chars" in meta:
        if len(meta["chars"]) > cfg.vocab_size:
            raise SampleError(f"{meta_path} has {len(meta['chars'])} characters but the model's vocab_size is {cfg.vocab_size}: wrong --meta")
        return CharTokenizer(meta["chars"], meta_path)
    if (meta is not None and meta.get("tokenizer") == "gpt2") or cfg.vocab_size == GPT2_PADDED_VOCAB:
        return GPT2Tokenizer()
    raise SampleError(f"cannot tell the tokenizer of a vocab_size {cfg.vocab_size} model: no meta.json next to its "
                      f"train_bin '{cfg.train_bin}'; pass --meta path/to/meta.json")


@torch.no_grad()
def generate(model, idx: torch.Tensor, num_tokens: int, seq_len: int, temperature: float = 1.0,
             top_k: int = 0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Append num_tokens tokens to idx (B, T): sample from softmax(logits / temperature) over the
    top_k logits (0: all), or take the argmax when temperature == 0."""
    model.eval()
    for _ in range(num_tokens):
        logits = model(idx[:, -seq_len:])[:, -1, :].float()
        if temperature == 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
        idx = torch.cat([idx, nxt], dim=1)
    return idx


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt", help="checkpoint of train_gpt.py (ckpt_final.pt or ckpt_stepN.pt)")
    ap.add_argument("--prompt", default="", help="text to continue (default: start of a document)")
    ap.add_argument("--num_tokens", type=int, default=256, help="tokens to generate")
    ap.add_argument("--num_samples", type=int, default=1)
    ap.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    ap.add_argument("--top_k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--meta", default=None, help="meta.json of a char-level model (default: next to its train shards)")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    args = ap.parse_args(argv)
    try:
        if args.num_tokens < 0 or args.num_samples < 1 or args.temperature < 0 or args.top_k < 0:
            raise SampleError("--num_tokens, --temperature and --top_k must be >= 0 and --num_samples >= 1")
        device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                              ("cpu" if args.device == "auto" else args.device))
        model, cfg, _ = model_from_checkpoint(args.ckpt, map_location="cpu")
        model.to(device)
        tok = tokenizer_for(cfg, args.ckpt, args.meta)
        ids = tok.encode(args.prompt) if args.prompt else tok.start()
        if max(ids) >= cfg.vocab_size:
            raise SampleError(f"prompt token {max(ids)} >= the model's vocab_size {cfg.vocab_size}")
        gen = torch.Generator(device=device).manual_seed(args.seed)
        x = torch.tensor([ids] * args.num_samples, dtype=torch.long, device=device)
        out = generate(model, x, args.num_tokens, cfg.seq_len, args.temperature, args.top_k, gen)
    except (SampleError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for i, row in enumerate(out.tolist()):
        if args.num_samples > 1:
            print(f"--- sample {i}")
        print(args.prompt + tok.decode(row[len(ids):]))  # the start token of an empty prompt is not printed
    return 0


if __name__ == "__main__":
    sys.exit(main())
