"""data/shakespeare_char.py: download from a local HTTP stand-in, sha256 check, clear offline error;
the data scripts' one import path."""

import functools
import http.server
import os
import shutil
import subprocess
import sys
import threading

import pytest

from conftest import REPO
from data import shakespeare_char as sc
from data import shards


@pytest.fixture
def served(tmp_path):
    """A local HTTP server over tmp_path/www; yields (root dir, base URL)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield root, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def real_text():
    src = os.environ.get("SHAKESPEARE_TXT") or os.path.join(REPO, "..", "shared", "data", "tinyshakespeare", "input.txt")
    if not os.path.isfile(src):
        pytest.fail("tiny Shakespeare input.txt not found: set SHAKESPEARE_TXT=/path/to/input.txt")
    return src


def test_download_writes_the_same_shards_as_a_local_copy(served, tmp_path):
    root, url = served
    shutil.copy(real_text(), root / "input.txt")
    sc.main(["--input", "", "--url", f"{url}/input.txt", "--out_dir", str(tmp_path / "dl")])
    sc.main(["--input", real_text(), "--out_dir", str(tmp_path / "local")])
    for f in ("train_000000.bin", "val_000000.bin"):
        assert (shards.read_shard(str(tmp_path / "dl" / f)) == shards.read_shard(str(tmp_path / "local" / f))).all()
    assert (tmp_path / "dl" / "meta.json").read_text() == (tmp_path / "local" / "meta.json").read_text()


def test_wrong_file_is_refused_by_its_sha256(served, tmp_path):
    root, url = served
    (root / "input.txt").write_text("not shakespeare\n" * 100)
    with pytest.raises(SystemExit, match="expected 86c4e6aa"):
        sc.main(["--input", "", "--url", f"{url}/input.txt", "--out_dir", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()  # nothing written


def test_unreachable_source_says_how_to_work_offline(served, tmp_path):
    _, url = served
    with pytest.raises(SystemExit, match="--input /path/to/input.txt"):
        sc.main(["--input", "", "--url", f"{url}/missing.txt", "--out_dir", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="no such file"):
        sc.main(["--input", str(tmp_path / "nope.txt"), "--out_dir", str(tmp_path / "x")])


def test_data_scripts_share_one_import_path():
    """Imported as data.X or run as python data/X.py, the data scripts use data.shards: a process
    holds one DataError (the trainer's), and every script starts as a script."""
    import train_gpt
    from data import cached_fineweb10B, fineweb
    assert cached_fineweb10B.DataError is shards.DataError is train_gpt.DataError
    assert fineweb.write_shard is sc.write_shard is shards.write_shard
    for script in ("fineweb.py", "cached_fineweb10B.py", "shakespeare_char.py"):
        r = subprocess.run([sys.executable, os.path.join(REPO, "data", script), "--help"], capture_output=True, text=True,
                           cwd=os.path.join(REPO, "data"))
        assert r.returncode == 0 and "usage:" in r.stdout, script + r.stderr
