"""The reproduction kit: data scripts, paper configs, the sigma_max sweep, the results table, the
frontier plot, sampling and the baseline arch, end to end on CPU at toy scale. No network: the
download code runs against a local stand-in of the Hugging Face Hub."""

import hashlib
import http.server
import json
import dataclasses
import math
import os
import re
import statistics
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from conftest import REPO, file_states, make_shards, read_metrics, tiny_args

sys.path.insert(0, os.path.join(REPO, "scripts"))
import plot_frontier  # noqa: E402
import results_table  # noqa: E402
import sample  # noqa: E402
import train_gpt  # noqa: E402
from data import cached_fineweb10B, fineweb, shards  # noqa: E402

TIKTOKEN_CACHE = os.path.join(REPO, "..", "shared", "data", "tiktoken_cache")
PAPER_CONFIGS = os.path.join(REPO, "configs", "paper")


@pytest.fixture
def gpt2(monkeypatch):
    if os.path.isdir(TIKTOKEN_CACHE):
        monkeypatch.setenv("TIKTOKEN_CACHE_DIR", os.path.abspath(TIKTOKEN_CACHE))
    import tiktoken
    return tiktoken.get_encoding("gpt2")


# -----------------------------------------------------------------------------
# data/fineweb.py: text -> GPT-2 shards


def test_fineweb_tokenizes_documents_into_val_then_train_shards(tmp_path, gpt2):
    docs = [f"Document {i}: " + "the quick brown fox jumps over the lazy dog. " * (1 + i % 7) for i in range(60)]
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    for i, d in enumerate(docs[:30]):
        (corpus / f"{i:03d}.txt").write_text(d)
    with open(corpus / "sub" / "rest.jsonl", "w") as fh:
        for d in docs[30:]:
            fh.write(json.dumps({"text": d, "id": 0}) + "\n")
    out = tmp_path / "out"
    rc = fineweb.main(["--input", str(corpus), "--out_dir", str(out), "--shard_tokens", "500", "--val_tokens", "700",
                       "--threads", "1"])
    assert rc == 0
    val = sorted(out.glob("fineweb_val_*.bin"))
    train = sorted(out.glob("fineweb_train_*.bin"))
    assert [p.name for p in val] == ["fineweb_val_000000.bin", "fineweb_val_000001.bin"]
    assert train[0].name == "fineweb_train_000002.bin"
    sizes = [len(shards.read_shard(str(p))) for p in val + train]
    assert sizes[:2] == [500, 200] and all(s == 500 for s in sizes[2:-1]) and 0 < sizes[-1] <= 500
    # reference: tiktoken on each document, each preceded by <|endoftext|>, in sorted file order
    ref = []
    for d in docs:
        ref += [fineweb.EOT] + gpt2.encode_ordinary(d)
    got = np.concatenate([shards.read_shard(str(p)) for p in val + train]).astype(np.int64)
    assert got.tolist() == ref
    assert json.loads((out / "meta.json").read_text())["tokenizer"] == "gpt2"


def test_fineweb_errors_say_what_to_do(tmp_path, gpt2):
    with pytest.raises(fineweb.CorpusError, match="no such file"):
        fineweb.list_inputs([str(tmp_path / "missing.txt")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(fineweb.CorpusError, match="no .txt or .jsonl files"):
        fineweb.list_inputs([str(tmp_path / "empty")])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(fineweb.CorpusError, match=r"bad.jsonl:2: .*'text' field"):
        fineweb.tokenize(fineweb.documents_from_files([str(bad)]), str(tmp_path / "o1"), enc=gpt2, threads=1)
    small = tmp_path / "small.txt"
    small.write_text("too short for a train split")
    with pytest.raises(fineweb.CorpusError, match="lower --val_tokens"):
        fineweb.tokenize(fineweb.documents_from_files([str(small)]), str(tmp_path / "o2"), val_tokens=1000, enc=gpt2)


# -----------------------------------------------------------------------------
# data/cached_fineweb10B.py against a local Hub stand-in


class LocalHub:
    """Serves the files of a folder as <url>/datasets/<repo>/resolve/<revision>/<name>, with the
    headers huggingface_hub needs (X-Repo-Commit, ETag, Content-Length) and byte ranges."""

    def __init__(self, root: str, repo_id: str):
        self.requests = []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _serve(self, body: bool):
                m = re.fullmatch(rf"/datasets/{re.escape(repo_id)}/resolve/[^/]+/(.+)", self.path.split("?")[0])
                path = os.path.join(root, m.group(1)) if m else ""
                hub.requests.append((self.command, os.path.basename(path)))
                if not os.path.isfile(path):
                    self.send_response(404)
                    self.send_header("X-Repo-Commit", "0" * 40)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = open(path, "rb").read()
                rng = re.match(r"bytes=(\d+)-", self.headers.get("Range") or "")
                start = int(rng.group(1)) if rng else 0
                self.send_response(206 if start else 200)
                self.send_header("X-Repo-Commit", "0" * 40)
                self.send_header("ETag", '"' + hashlib.sha1(data).hexdigest() + '"')
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                if body:
                    self.wfile.write(data[start:])

            def do_HEAD(self):
                self._serve(body=False)

            def do_GET(self):
                self._serve(body=True)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def gets(self):
        return [name for method, name in self.requests if method == "GET"]


@pytest.fixture
def hub(tmp_path):
    src = tmp_path / "hub"
    src.mkdir()
    rng = np.random.default_rng(0)
    for name in cached_fineweb10B.shard_names(2):
        shards.write_shard(str(src / name), rng.integers(0, 50257, 3000))
    h = LocalHub(str(src), cached_fineweb10B.REPO_ID)
    h.src = src
    yield h
    h.server.shutdown()


def test_download_fetches_verifies_and_skips_complete_shards(tmp_path, hub):
    out = tmp_path / "fineweb10B"
    paths = cached_fineweb10B.download(2, str(out), endpoint=hub.url, log=lambda m: None)
    assert [os.path.basename(p) for p in paths] == ["fineweb_val_000000.bin", "fineweb_train_000001.bin",
                                                     "fineweb_train_000002.bin"]
    for p in paths:
        assert open(p, "rb").read() == (hub.src / os.path.basename(p)).read_bytes()
    assert len(hub.gets()) == 3
    # a second run downloads nothing; a truncated shard is fetched again
    hub.requests.clear()
    with open(paths[1], "r+b") as fh:
        fh.truncate(1000)
    cached_fineweb10B.download(2, str(out), endpoint=hub.url, log=lambda m: None)
    assert hub.gets() == ["fineweb_train_000001.bin"]
    assert open(paths[1], "rb").read() == (hub.src / "fineweb_train_000001.bin").read_bytes()
    # the trainer's default glob pattern finds them
    assert len(train_gpt.find_shards(str(out / "fineweb_train_*.bin"), "train")) == 2


def test_download_errors_are_explained(tmp_path, hub, capsys):
    with pytest.raises(cached_fineweb10B.DownloadError, match="fineweb_train_000003.bin is not in kjj0/fineweb10B-gpt2"):
        cached_fineweb10B.download(3, str(tmp_path / "a"), endpoint=hub.url, log=lambda m: None)
    with pytest.raises(cached_fineweb10B.DownloadError, match="the repo has 1 to 103"):
        cached_fineweb10B.shard_names(104)
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(**kw):  # what hf_hub_download raises when the Hub cannot be reached
        raise LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub")

    with pytest.raises(cached_fineweb10B.DownloadError, match="cannot reach .* re-run the same command"):
        cached_fineweb10B.download(0, str(tmp_path / "b"), download_fn=offline, log=lambda m: None)
    assert cached_fineweb10B.main(["0", "--out_dir", str(tmp_path / "c"), "--repo_id", "nobody/nothing",
                                   "--endpoint", hub.url]) == 1
    assert "error:" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# configs/paper: one file per row, the paper's numbers in each header


def test_paper_configs_parse_and_follow_the_published_settings():
    names = sorted(f for f in os.listdir(PAPER_CONFIGS) if f.endswith(".toml"))
    assert len(names) >= 9
    for name in names:
        path = os.path.join(PAPER_CONFIGS, name)
        cfg = train_gpt.parse_config(["--config", path])
        header = open(path).read().split("\n\n")[0]
        assert header.startswith("# Paper") and "Paper" in header, name
        if cfg.arch == "baseline":
            assert cfg.constraint == "none"
        elif cfg.vocab_size == 50304:  # 145M rows: s = 24 at w_max 1, else sqrt(128) / w_max^2 (paper.md section 2)
            s = 24.0 if cfg.w_max == 1 else math.sqrt(128) / cfg.w_max**2
            assert cfg.softmax_scale == pytest.approx(s, rel=1e-12), name
    steps = {n: train_gpt.parse_config(["--config", os.path.join(PAPER_CONFIGS, n)]).num_steps for n in names}
    assert steps["w16_spectral_normalize_4x.toml"] == 4 * 1770
    assert steps["w1_soft_cap_6200.toml"] == 6200


# -----------------------------------------------------------------------------
# results_table.py: grouping over seeds against statistics.mean / stdev


def _fake_run(d, seed, w, loss, acc, log10_tight, arch="lipschitz", slice_loss=None, **over):
    os.makedirs(d)
    cfg = dataclasses_asdict(train_gpt.Config(seed=seed, w_max=w, arch=arch, out_dir=d, **over))
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    final = {"step": 1770, "val_loss": loss, "val_acc": acc, "max_act_entry": 2.0 + seed}
    if slice_loss is not None:
        final["slice_val_loss"] = slice_loss
    with open(os.path.join(d, "metrics.jsonl"), "w") as fh:
        fh.write(json.dumps({"step": 10, "val_loss": 9.0, "val_acc": 0.0, "max_act_entry": 1.0}) + "\n")
        fh.write(json.dumps(final) + "\n")
        fh.write(json.dumps({"step": 1770, "train_loss": 4.0}) + "\n")  # a training line may follow
    open(os.path.join(d, "ckpt_final.pt"), "wb").close()
    cert = ({"certified": False, "reason": "baseline"} if arch == "baseline" else
            {"mode": "all", "modes": {"paper": {"log10_bound": log10_tight - 1}, "tight": {"log10_bound": log10_tight}}})
    json.dump(cert, open(os.path.join(d, "certificate.json"), "w"))


def dataclasses_asdict(cfg):
    import dataclasses
    return dataclasses.asdict(cfg)


def test_results_table_groups_seeds(tmp_path):
    runs = {(0, 1.0): (5.0, 0.20, 2.5), (1, 1.0): (5.2, 0.22, 2.9), (2, 1.0): (5.1, 0.25, 2.6), (0, 8.0): (3.6, 0.36, 118.0)}
    dirs = []
    for (seed, w), (loss, acc, lt) in runs.items():
        dirs.append(str(tmp_path / f"w{w}_s{seed}"))
        _fake_run(dirs[-1], seed, w, loss, acc, lt)
    dirs.append(str(tmp_path / "base"))
    _fake_run(dirs[-1], 0, 1.0, 3.3, 0.39, 0.0, arch="baseline", constraint="none")
    (tmp_path / "not_a_run").mkdir()
    rows = results_table.group_runs(results_table.load_runs(dirs + [str(tmp_path / "not_a_run")], warn=lambda m: None))
    assert len(rows) == 3 and rows[0]["config"]["arch"] == "baseline"
    w1 = next(r for r in rows if r["config"]["w_max"] == 1.0 and r["config"]["arch"] == "lipschitz")
    assert w1["seeds"] == [0, 1, 2]
    assert w1["val_loss"][0] == pytest.approx(statistics.mean([5.0, 5.2, 5.1]))
    assert w1["val_loss"][1] == pytest.approx(statistics.stdev([5.0, 5.2, 5.1]))
    assert w1["log10_tight"][0] == pytest.approx(statistics.mean([2.5, 2.9, 2.6]))
    table = results_table.markdown_table(rows)
    lines = table.splitlines()
    assert len(lines) == 2 + 3
    assert "| inf | inf |" in lines[2]                       # the baseline has no certificate
    assert "10^118.00" in table and "10^2.67 ± 0.21" in table
    assert f"{statistics.mean([0.20, 0.22, 0.25]):.4f} ± {statistics.stdev([0.20, 0.22, 0.25]):.4f}" in table
    assert "1770 / 0.70B" in table
    with pytest.raises(results_table.ResultsError, match="none of the 1 directories"):
        results_table.load_runs([str(tmp_path / "not_a_run")], warn=lambda m: None)
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "config.json").write_text("{bad")
    (damaged / "metrics.jsonl").write_text('{"val_loss": 1.0}\n')
    with pytest.raises(results_table.ResultsError, match="config.json: not valid JSON"):
        results_table.load_run(str(damaged))
    r = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "results_table.py"), str(damaged)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "not valid JSON" in r.stderr and "Traceback" not in r.stderr
    assert "slice val loss" not in table and all(line.startswith("| repo |") for line in lines[2:])


@pytest.mark.usefixtures("one_thread")
def test_results_table_certify_computes_a_missing_certificate(tmp_path):
    """A finished run whose certificate.json is missing (its process ended between the final
    checkpoint and the certificate): the table shows '-' for its bounds, and with --certify it
    computes the certificate, saves it (the same as the trainer's) and shows the bounds."""
    data = make_shards(str(tmp_path / "data"))
    run = str(tmp_path / "run")
    assert train_gpt.main(tiny_args(data, run, num_steps=2)) == 0
    cert_path = os.path.join(run, "certificate.json")
    with open(cert_path) as fh:
        trainer_cert = json.load(fh)
    os.remove(cert_path)
    script = [sys.executable, os.path.join(REPO, "scripts", "results_table.py"), run]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(script, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    row = r.stdout.splitlines()[2]
    assert "| - | - |" in row and not os.path.exists(cert_path)  # without --certify: nothing computed
    r = subprocess.run(script + ["--certify", "--out", str(tmp_path / "t.md")], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    with open(cert_path) as fh:
        cert = json.load(fh)
    assert cert.pop("certify_s") > 0 and trainer_cert.pop("certify_s") > 0  # its own timing
    assert cert == trainer_cert
    paper, tight = (cert["modes"][m]["log10_bound"] for m in ("paper", "tight"))
    assert f"| 10^{paper:.2f} | 10^{tight:.2f} |" in r.stdout.splitlines()[2]
    assert (tmp_path / "t.md").read_text() == r.stdout


def test_results_table_shows_recipe_and_slice(tmp_path):
    """A run of the reference recipe that scored the reference's slice: its own recipe tag and a slice
    column; a repo-recipe run next to it has '-' there."""
    _fake_run(str(tmp_path / "ref"), 0, 2.0, 1.60, 0.5, 3.0, slice_loss=1.45, lr_alloc="modula", blocks_mass=16.0)
    _fake_run(str(tmp_path / "ours"), 0, 2.0, 1.58, 0.5, 3.0)
    table = results_table.markdown_table(results_table.group_runs(results_table.load_runs(
        [str(tmp_path / "ref"), str(tmp_path / "ours")])))
    lines = table.splitlines()
    assert lines[0].startswith("| recipe |") and lines[0].endswith("| slice val loss |")
    ref = next(line for line in lines if "reference (blocks mass 16)" in line)
    ours = next(line for line in lines if line.startswith("| repo |"))
    assert ref.endswith("| 1.4500 |") and "| 1.6000 |" in ref and ours.endswith("| - |")


# -----------------------------------------------------------------------------
# End to end: a toy sweep on CPU, the baseline arch, sampling


def _toy_config(tmp_path, data_dir):
    over = dict(num_steps=8, eval_every=4, constraint="soft_cap")
    args = tiny_args(data_dir, "unused", **over)
    table = {args[i][2:]: args[i + 1] for i in range(0, len(args), 2) if args[i] != "--out_dir"}
    lines = []
    for k, v in table.items():
        typ = {f.name: f.type for f in train_gpt.fields(train_gpt.Config)}[k]
        lines.append(f'{k} = "{v}"' if typ == "str" else f"{k} = {v}")
    path = tmp_path / "toy.toml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_toy_sweep_end_to_end(tmp_path):
    """Two runs, both at their cap from init (gain min(1, w_max)); then a re-run skips the finished
    run and resumes the interrupted one (a ckpt_step*.pt and no ckpt_final.pt) to the same weights."""
    data = make_shards(str(tmp_path / "data"))
    config = _toy_config(tmp_path, data)
    out = tmp_path / "sweep"
    cmd = ["bash", os.path.join(REPO, "scripts", "sweep_sigma_max.sh"), "--config", config, "--w_max", "0.5 1",
           "--out", str(out), "--", "--save_every", "4"]
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    runs = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert runs == ["soft_cap_w0.5_s0", "soft_cap_w1_s0"]
    table = (out / "results.md").read_text().splitlines()
    assert len(table) == 4
    for name, w in (("soft_cap_w0.5_s0", "0.5"), ("soft_cap_w1_s0", "1")):
        run = out / name
        cfg = json.loads((run / "config.json").read_text())
        assert cfg["w_max"] == float(w) and (run / "ckpt_final.pt").is_file()
        cert = json.loads((run / "certificate.json").read_text())
        tight = cert["modes"]["tight"]["log10_bound"]
        assert math.isfinite(tight)
        final = read_metrics(run, "val_loss")[-1]
        row = next(line for line in table if f"| {w} |" in line)
        assert f"10^{tight:.2f}" in row and f"{final['val_loss']:.4f}" in row and f"{final['val_acc']:.4f}" in row
        # every matrix respected its cap, which binds (the measured norms of the final eval)
        hidden = [v for k, v in final["norms"].items() if k.startswith("blocks")]
        assert 0.9 * float(w) <= max(hidden) <= float(w) * (1 + 1e-5)
    assert (out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # an interrupted run (killed after its step-4 checkpoint) is resumed; the finished one is skipped
    run = out / "soft_cap_w1_s0"
    done = train_gpt.load_checkpoint(str(run / "ckpt_final.pt"))["model"]
    os.remove(run / "ckpt_final.pt")
    os.remove(run / "certificate.json")
    kept = {n: (out / "soft_cap_w0.5_s0" / n).read_bytes() for n in ("ckpt_final.pt", "metrics.jsonl", "config.json")}
    r2 = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r2.returncode == 0, r2.stdout[-3000:] + r2.stderr[-3000:]
    assert r2.stdout.count("finished, skipped") == 1 and "soft_cap_w1_s0: interrupted, resuming" in r2.stdout
    assert "resumed at step 4" in r2.stdout
    again = train_gpt.load_checkpoint(str(run / "ckpt_final.pt"))["model"]
    assert again.keys() == done.keys() and all(torch.equal(again[k], done[k]) for k in done)
    assert json.loads((run / "certificate.json").read_text())["modes"]["tight"]["log10_bound"] == tight
    assert {n: (out / "soft_cap_w0.5_s0" / n).read_bytes() for n in kept} == kept
    assert (out / "results.md").read_text().splitlines() == table
    # re-running fills gaps only: nothing left to train
    r3 = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r3.returncode == 0 and r3.stdout.count("finished, skipped") == 2, r3.stdout + r3.stderr


def test_frontier_plot_names_its_missing_requirement(tmp_path, monkeypatch):
    """Without matplotlib the plot says what to install (the sweep prints it and still writes results.md)."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(results_table.ResultsError, match=r"needs matplotlib.*pip install -r requirements.txt"):
        plot_frontier.plot([], str(tmp_path / "f.png"))
    assert not (tmp_path / "f.png").exists()


def test_sweep_fails_fast_with_clear_errors(tmp_path):
    sweep = os.path.join(REPO, "scripts", "sweep_sigma_max.sh")
    config = _toy_config(tmp_path, make_shards(str(tmp_path / "data")))
    env = dict(os.environ, PYTHON=sys.executable)

    def run(*args):
        return subprocess.run(["bash", sweep, *args], capture_output=True, text=True, env=env, timeout=120)

    r = run("--config", config)
    assert r.returncode == 2 and "--w_max" in r.stderr
    r = run("--config", config, "--w_max", "1", "--", "--out_dir", "x")
    assert r.returncode == 2 and "set by the sweep itself" in r.stderr
    r = run("--config", config, "--w_max", "1", "--constraints", "soft_cap nonsense", "--out", str(tmp_path / "s"))
    assert r.returncode == 2 and "nonsense" in r.stderr and not (tmp_path / "s").exists()
    r = run("--config", config, "--w_max", "1 4", "--nproc", "2", "--dry_run", "--paper_softmax_scale", "--out", str(tmp_path / "d"))
    assert r.returncode == 0 and r.stdout.count("--nproc_per_node=2") == 2
    assert "--softmax_scale 24.0" in r.stdout and f"--softmax_scale {math.sqrt(128) / 16!r}" in r.stdout
    r = run("--config", config, "--w_max", "1 4", "--tie_head", "--dry_run", "--out", str(tmp_path / "d"))
    assert r.returncode == 0 and "--w_max 1 " in r.stdout and "--head_w_max 1 " in r.stdout and "--head_w_max 4 " in r.stdout
    r = run("--config", config, "--w_max", "1", "--tie_head", "--", "--head_w_max", "2")
    assert r.returncode == 2 and "--tie_head sets head_w_max" in r.stderr
    # an unfinished run without a checkpoint stops the sweep instead of being overwritten
    (tmp_path / "u" / "soft_cap_w1_s0").mkdir(parents=True)
    (tmp_path / "u" / "soft_cap_w1_s0" / "config.json").write_text("{}")
    before = file_states(str(tmp_path / "u"))
    r = run("--config", config, "--w_max", "1", "--out", str(tmp_path / "u"))
    assert r.returncode == 2 and "rm -r" in r.stderr
    assert file_states(str(tmp_path / "u")) == before


def test_baseline_arch_trains_and_logs_activations(tmp_path):
    data = make_shards(str(tmp_path / "data"))
    out = str(tmp_path / "base")
    args = tiny_args(data, out, arch="baseline", constraint="none", optimizer="adamw", lr_hidden=3e-3, lr_head=3e-3,
                     lr_embed=3e-3, emb_w_max=1e9, num_steps=6, eval_every=3)
    assert train_gpt.main(args) == 0
    lines = read_metrics(out, "val_loss")
    assert [m["step"] for m in lines] == [3, 6]
    for m in lines:
        assert math.isfinite(m["max_act_entry"]) and m["max_act_entry"] > 0 and math.isfinite(m["val_loss"])
    # the logged entry is the largest |activation| over the residual stream: recompute it
    model, cfg, _ = train_gpt.model_from_checkpoint(os.path.join(out, "ckpt_final.pt"))
    val = train_gpt.load_val_tokens(cfg.val_bin, cfg.val_tokens, cfg.seq_len, cfg.vocab_size)
    n = (val.numel() - 1) // cfg.seq_len
    acts = []
    with torch.no_grad():
        model(val[: n * cfg.seq_len].view(n, cfg.seq_len), acts=acts)
    assert lines[-1]["max_act_entry"] == pytest.approx(max(float(a.abs().max()) for a in acts), rel=1e-5)
    rows = results_table.group_runs(results_table.load_runs([out], certify=True))
    assert "| inf | inf |" in results_table.markdown_table(rows)


@pytest.fixture(scope="module")
def char_ckpt(tmp_path_factory):
    """A tiny char-level checkpoint whose train shards sit next to a meta.json."""
    root = tmp_path_factory.mktemp("charmodel")
    data = make_shards(str(root / "data"), vocab=40)
    chars = list("\n abcdefghijklmnopqrstuvwxyzABCDEFGHIJKL")
    assert len(chars) == 40
    json.dump({"vocab_size": 40, "chars": chars, "tokenizer": "char"}, open(os.path.join(data, "meta.json"), "w"))
    out = str(root / "run")
    assert train_gpt.main(tiny_args(data, out, vocab_size=40, num_steps=3)) == 0
    return os.path.join(out, "ckpt_final.pt"), chars


def test_sample_generates_requested_length(char_ckpt, capsys):
    ckpt, chars = char_ckpt
    assert sample.main([ckpt, "--prompt", "hello", "--num_tokens", "45", "--top_k", "5", "--seed", "1"]) == 0
    text = capsys.readouterr().out
    assert text.endswith("\n") and text.startswith("hello")
    assert len(text[:-1]) == 5 + 45 and set(text[:-1]) <= set(chars)
    assert sample.main([ckpt, "--prompt", "héllo", "--num_tokens", "3"]) == 2
    assert "not in the vocabulary" in capsys.readouterr().err


def test_sample_greedy_and_top1_match_argmax_reference(char_ckpt):
    ckpt, _ = char_ckpt
    model, cfg, _ = train_gpt.model_from_checkpoint(ckpt)
    x = torch.tensor([[3, 4, 5]])
    ref = x.clone()
    with torch.no_grad():
        for _ in range(40):  # longer than seq_len 32: the context must be cropped
            ref = torch.cat([ref, model(ref[:, -cfg.seq_len:])[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(sample.generate(model, x, 40, cfg.seq_len, temperature=0), ref)
    top1 = sample.generate(model, x, 40, cfg.seq_len, temperature=1.0, top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(top1, ref)


def test_sample_picks_gpt2_for_padded_vocab(tmp_path, gpt2):
    cfg = train_gpt.Config(vocab_size=50304, train_bin=str(tmp_path / "none" / "x_*.bin"))
    tok = sample.tokenizer_for(cfg, str(tmp_path / "ckpt.pt"), None)
    assert tok.decode(tok.encode("Hello world")) == "Hello world"
    cfg = dataclasses.replace(cfg, vocab_size=100)
    with pytest.raises(sample.SampleError, match="--meta"):
        sample.tokenizer_for(cfg, str(tmp_path / "ckpt.pt"), None)


# -----------------------------------------------------------------------------
# Smoke runs of the frontier and benchmark scripts at toy size (what they print is checked, not timed)

TOY_MODEL = dict(vocab_size=65, n_layer=1, n_head=2, d_model=32, seq_len=32, batch_tokens=128, micro_batch_tokens=128)


def _toy_model_toml(tmp_path):
    path = tmp_path / "toy_model.toml"
    path.write_text("".join(f"{k} = {v}\n" for k, v in TOY_MODEL.items()))
    return str(path)


def test_shakespeare_frontier_smoke(shakespeare_dir, tmp_path):
    """scripts/shakespeare_frontier.sh --short with --only three of its runs (the baseline, soft cap,
    hard cap) and a toy model on the real shards: each run trains with its grid settings, then the
    table with a certificate per Lipschitz run and both plots."""
    script = os.path.join(REPO, "scripts", "shakespeare_frontier.sh")
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    dry = subprocess.run(["bash", script, "--short", "--dry_run"], capture_output=True, text=True, env=env, timeout=60)
    names = [line.split()[0] for line in dry.stdout.splitlines()[1:]]
    assert dry.returncode == 0 and len(names) == len(set(names)) == 21, dry.stdout
    only = "^(baseline_s0|muon_soft_cap_w3.0_ss16_fs8_s0|muon_hard_cap_w1.0_ss16_fs2_s0)$"
    toy = [f"--{k}={v}" for k, v in TOY_MODEL.items()] + [
        "--num_steps=2", "--eval_every=0", "--val_tokens=1024", "--dtype=fp32", "--device=cpu", "--momentum_warmup_steps=1",
        f"--train_bin={os.path.join(shakespeare_dir, 'train_*.bin')}", f"--val_bin={os.path.join(shakespeare_dir, 'val_*.bin')}"]
    out = tmp_path / "frontier"
    r = subprocess.run(["bash", script, "--short", "--only", only, "--out", str(out), "--", *toy],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    want = {"baseline_s0": dict(arch="baseline", constraint="none", optimizer="adamw"),
            "muon_soft_cap_w3.0_ss16_fs8_s0": dict(constraint="soft_cap", w_max=3.0, head_w_max=3.0, softmax_scale=16.0, final_scale=8.0),
            "muon_hard_cap_w1.0_ss16_fs2_s0": dict(constraint="hard_cap", w_max=1.0, head_w_max=1.0, softmax_scale=16.0, final_scale=2.0)}
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(want)
    for name, settings in want.items():
        cfg = json.loads((out / name / "config.json").read_text())
        assert {k: cfg[k] for k in settings} == settings and cfg["num_steps"] == 2 and cfg["d_model"] == 32, name
        assert (out / name / "ckpt_final.pt").is_file() and (out / name / "certificate.json").is_file()
    rows = (out / "results.md").read_text().splitlines()[2:]
    assert len(rows) == 3 and sum("| inf | inf |" in row for row in rows) == 1  # the baseline: no certificate
    assert all(re.search(r"\| 10\^-?\d+\.\d\d \| 10\^-?\d+\.\d\d \|", row) for row in rows if "baseline" not in row)
    for png in ("frontier.png", "frontier_paper.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_step_smoke(tmp_path):
    """scripts/bench_step.py on a toy model: every variant runs, its parts are timed (the constraint
    through MatrixOptimizer.mark) and its loss matches the eager fp32 loss."""
    out = str(tmp_path / "bench.json")
    r = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "bench_step.py"), "--config", _toy_model_toml(tmp_path),
                        "--dtype", "bf16", "--plain_dtypes", "fp32", "--constraints", "soft_cap,hard_cap", "--steps", "1",
                        "--warmup", "1", "--batch", "2", "--threads", "1", "--device", "cpu", "--json", out],
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.load(open(out))
    assert res["tokens_per_step"] == 64 and [v["name"] for v in res["results"]] == [
        "ours soft_cap bf16", "ours hard_cap bf16", "plain AdamW fp32"]
    for v in res["results"]:
        assert v["loss_ok"] and math.isfinite(v["loss_configured"]) and v["step_s"] > 0, v
        parts = v["parts_s"]
        assert parts["fwd_bwd"] > 0 and parts["update"] > 0, v
        if v["kind"] == "ours":
            assert parts["constraint"] > 0 and parts["bookkeeping"] > 0, v
    assert "configured-vs-eager-fp32 loss check: all within 2% relative" in r.stdout


def test_bitwise_check_finds_one_flipped_bit(shakespeare_dir, tmp_path, capsys):
    """scripts/bitwise_check.py (the refactor check): two 3-step trainings of the same code compare identical
    (paths and timings aside); one flipped bit in one checkpoint's head is found, and the exit code says so."""
    import bitwise_check
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    for out in (a, b):
        bitwise_check.train_all(REPO, out, ["quick"], 3)
    assert bitwise_check.main(["--compare", a, b]) == 0 and "quick: 6 metrics records, 3 checkpoints: identical" in capsys.readouterr().out
    path = os.path.join(b, "quick", "ckpt_final.pt")
    ck = torch.load(path, weights_only=True)
    ck["model"]["head"].view(torch.int32)[0, 0] ^= 1  # the last bit of one weight
    torch.save(ck, path)
    assert bitwise_check.main(["--compare", a, b]) == 1
    assert "quick: 6 metrics records, 3 checkpoints: DIFFER in 1 places: ckpt_final.pt.model.head" in capsys.readouterr().out


def test_bench_constraints_smoke(tmp_path):
    """scripts/bench_constraints.py at toy shapes and a toy model: every method on every shape, the
    guaranteed ones at or under w_max after the call, the step-fraction table, the tracking check."""
    methods = ["spectral_normalize", "soft_cap", "hard_cap", "stiefel", "svd_clip"]
    r = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "bench_constraints.py"), "--shapes", "48x32,32x96",
                        "--config", _toy_model_toml(tmp_path), "--repeats", "1", "--tracking_steps", "6",
                        "--methods", ",".join(methods)],
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = r.stdout.splitlines()
    for shape in ("48x32", "32x96"):
        for m in methods:
            row = next(line.split() for line in lines if line.split()[:2] == [m, shape])
            after = float(row[3])
            assert after <= 1 + 1e-3 if m in train_gpt.GUARANTEED else after > 0, (m, shape, row)
    assert "above w_max" not in r.stdout
    i = lines.index(next(line for line in lines if line.startswith("toy_model.toml model (1 layers, d 32")))
    assert [line.split()[0] for line in lines[i + 3: i + 3 + len(methods)]] == methods
    assert sum("worst relative underestimate of sigma_1 over steps 5-5" in line for line in lines) == 4
