"""Fetching a dataset on a fresh machine, against an HTTP server on 127.0.0.1 serving a small CIFAR-10 archive
written here in the official format: checksum verified (a mismatch is refused and leaves nothing), a transfer
that breaks off is resumed with an HTTP Range request (or restarted when the server ignores Range), the file
lands once in the user's cache folder, and `fastrobust train --preset quickstart` fetches it by itself."""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import json
import threading

import pytest

from fastrobust.cli import main
from fastrobust.data import datasets as ds
from fastrobust.data import load_dataset
from fastrobust.errors import DataError

from helpers import write_cifar10_archive

NAME = "cifar-10-python.tar.gz"


class Server:
    """Serves ``payload`` at /NAME; ``cut_first``: the first response stops after that many bytes (the
    connection drops); ``ranges``: whether Range requests are honoured (206) or ignored (200, whole file)."""

    def __init__(self, payload: bytes, *, cut_first: int | None = None, ranges: bool = True):
        self.payload, self.cut_first, self.ranges = payload, cut_first, ranges
        self.requests: list[str | None] = []  # the Range header of each request
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                wanted = self.headers.get("Range")
                server.requests.append(wanted)
                if self.path != f"/{NAME}":
                    self.send_error(404)
                    return
                start = int(wanted[len("bytes="):].split("-")[0]) if wanted and server.ranges else 0
                body = server.payload[start:]
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(body)))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(server.payload) - 1}/{len(server.payload)}")
                self.end_headers()
                if server.cut_first is not None and len(server.requests) == 1:
                    self.wfile.write(body[: server.cut_first])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)  # the connection drops mid-transfer
                    return
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/{NAME}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "Server":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> bytes:
    folder = tmp_path_factory.mktemp("official")
    write_cifar10_archive(folder / NAME, per_batch=12)
    return (folder / NAME).read_bytes()


@pytest.fixture
def fresh_machine(tmp_path, monkeypatch):
    """No FASTROBUST_DATA, an empty home (so ~/.cache/fastrobust/data is empty), a private decoded cache."""
    monkeypatch.delenv("FASTROBUST_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FASTROBUST_CACHE", str(tmp_path / "decoded"))
    return tmp_path / "home" / ".cache" / "fastrobust" / "data"


def serve_as_cifar10(monkeypatch, url: str, md5: str) -> None:
    item = ds.Download(url, NAME, md5)
    monkeypatch.setitem(ds.SPECS, "cifar10", dataclasses.replace(ds.SPECS["cifar10"], downloads=(item,)))


def test_a_fresh_machine_downloads_once_into_the_cache_folder(archive, fresh_machine, monkeypatch):
    with Server(archive) as server:
        serve_as_cifar10(monkeypatch, server.url, hashlib.md5(archive).hexdigest())
        data = load_dataset("cifar10", val_size=10)
        assert (fresh_machine / NAME).read_bytes() == archive and len(data.train) == 50 and len(data.test) == 12
        assert sorted(p.name for p in fresh_machine.iterdir()) == [NAME]  # no part, no lock file
        load_dataset("cifar10", val_size=10)
        assert server.requests == [None]  # cached once: the second load fetched nothing


def test_a_checksum_mismatch_is_refused_and_leaves_nothing(archive, fresh_machine, monkeypatch):
    with Server(archive) as server:
        serve_as_cifar10(monkeypatch, server.url, "0" * 32)
        with pytest.raises(DataError, match=r"(?s)download failed: download of http://127\.0\.0\.1.* has md5 "
                                            r"[0-9a-f]{32}, expected 0{32}; the file was discarded"):
            load_dataset("cifar10", val_size=10)
    assert not fresh_machine.exists() or list(fresh_machine.iterdir()) == []  # the folder it made is removed


@pytest.mark.parametrize("ranges", [True, False], ids=["resumed", "restarted"])
def test_a_transfer_that_breaks_off_is_resumed_or_restarted(archive, fresh_machine, monkeypatch, ranges):
    cut = len(archive) // 3
    with Server(archive, cut_first=cut, ranges=ranges) as server:
        serve_as_cifar10(monkeypatch, server.url, hashlib.md5(archive).hexdigest())
        data = load_dataset("cifar10", val_size=10)
    assert server.requests == [None, f"bytes={cut}-"]  # the second request asks for the rest
    assert (fresh_machine / NAME).read_bytes() == archive and len(data.train) == 50
    assert sorted(p.name for p in fresh_machine.iterdir()) == [NAME]


def test_a_part_left_by_an_earlier_run_is_resumed(archive, fresh_machine, monkeypatch):
    fresh_machine.mkdir(parents=True)
    (fresh_machine / f"{NAME}.part").write_bytes(archive[:1000])
    with Server(archive) as server:
        serve_as_cifar10(monkeypatch, server.url, hashlib.md5(archive).hexdigest())
        ds.download_file(ds.SPECS["cifar10"].downloads[0], fresh_machine, progress=False)
    assert server.requests == ["bytes=1000-"] and (fresh_machine / NAME).read_bytes() == archive


def test_offline_without_a_copy_fails_with_the_clear_message(fresh_machine, monkeypatch):
    with Server(b"") as server:
        url = server.url
    serve_as_cifar10(monkeypatch, url, "0" * 32)  # the server is gone: connection refused
    with pytest.raises(DataError, match=r"^cifar10: download failed: cannot download http://127\.0\.0\.1.*Fix: run it "
                                        r"again with a network .*--data-root DIR or FASTROBUST_DATA=DIR$") as error:
        load_dataset("cifar10")
    assert "\n" not in str(error.value) and len(str(error.value)) < 300  # one short line, not the 900 characters
    assert not any(fresh_machine.glob("*")) if fresh_machine.exists() else True


def test_an_explicit_root_is_an_offline_copy_and_is_never_downloaded_into(tmp_path, fresh_machine, monkeypatch):
    def no_network(*_args, **_kwargs):
        raise AssertionError("downloaded into an explicit root")

    monkeypatch.setattr(ds.urllib.request, "urlopen", no_network)
    (tmp_path / "offline").mkdir()
    with pytest.raises(DataError, match="cifar10 not found under data root .*offline"):
        load_dataset("cifar10", tmp_path / "offline")
    monkeypatch.setenv("FASTROBUST_DATA", str(tmp_path / "offline"))
    with pytest.raises(DataError, match="cifar10 not found under data root .*offline"):
        load_dataset("cifar10")


def test_train_quickstart_fetches_cifar10_by_itself(archive, fresh_machine, monkeypatch, tmp_path, capsys, one_thread):
    monkeypatch.chdir(tmp_path)
    with Server(archive) as server:
        serve_as_cifar10(monkeypatch, server.url, hashlib.md5(archive).hexdigest())
        code = main(["train", "--preset", "quickstart", "--train-subset", "40", "--val-size", "10", "--test-subset", "12",
                     "--epochs", "1", "--device", "cpu", "--out", "runs/quickstart", "--quiet", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"downloading {server.url}" in captured.err
    result = json.loads(captured.out)
    assert result["dataset"]["source"].startswith(str(fresh_machine / NAME)) and result["test"]["n"] == 12
