"""Download cache tests against a local HTTP server on 127.0.0.1 (no other host is contacted)."""

import bz2
import gzip
import hashlib
import http.server
import lzma
import os
import threading
import urllib.parse

import pytest

from fedjax_sim.data import download as dl

PAYLOAD = bytes(range(256)) * 40  # 10,240 bytes: several reads, cheap to hash.


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves files from `server.root`; the first path component picks the behaviour.

    /good/<name>       the file, with a correct Content-Length.
    /truncated/<name>  announces the full Content-Length, sends half, closes the connection.
    /tampered/<name>   the right length, but one byte flipped.
    /nolength/<name>   the file without Content-Length (the body ends when the connection does).
    """

    def do_GET(self):  # noqa: N802 (name fixed by http.server)
        self.server.requests.append(self.path)
        mode, _, name = urllib.parse.urlparse(self.path).path.lstrip("/").partition("/")
        path = self.server.root / name
        if not path.is_file():
            self.send_error(404)
            return
        body = path.read_bytes()
        if mode == "tampered":
            body = bytes([body[0] ^ 0xFF]) + body[1:]
        self.send_response(200)
        if mode != "nolength":
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2] if mode == "truncated" else body)
        self.wfile.flush()
        # HTTP/1.0: the connection closes when the handler returns, ending a short body early.

    def log_message(self, *args):
        """Keeps the test output quiet."""


@pytest.fixture
def server(tmp_path, monkeypatch):
    """A local file server; yields (base URL, served folder, list of request paths)."""
    # urllib honours proxy variables; make sure a user's proxy never sees these requests.
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    root = tmp_path / "served"
    root.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.root = root
    httpd.requests = []
    # A short poll interval: shutdown() waits for one poll, 0.5 s by default.
    thread = threading.Thread(target=httpd.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", root, httpd.requests
    httpd.shutdown()
    httpd.server_close()
    thread.join()


@pytest.fixture
def cache(tmp_path):
    path = tmp_path / "cache"
    path.mkdir()
    return path


def test_good_download_is_cached_and_reused_without_network(server, cache):
    base, root, requests = server
    (root / "data.sqlite").write_bytes(PAYLOAD)
    url = f"{base}/good/data.sqlite"

    first = dl.download(url, sha256=sha256(PAYLOAD), cache_dir=cache, progress=False)
    second = dl.download(url, sha256=sha256(PAYLOAD), cache_dir=cache, progress=False)

    assert first == second == cache / "data.sqlite"
    assert first.read_bytes() == PAYLOAD
    assert len(requests) == 1
    assert not list(cache.glob("*.part-*"))


def test_truncated_download_raises_and_leaves_nothing(server, cache):
    base, root, _ = server
    (root / "data.sqlite").write_bytes(PAYLOAD)
    url = f"{base}/truncated/data.sqlite"

    with pytest.raises(dl.DownloadError, match="truncated") as info:
        dl.download(url, cache_dir=cache, progress=False)

    message = str(info.value)
    assert url in message
    assert str(len(PAYLOAD) // 2) in message and str(len(PAYLOAD)) in message
    assert list(cache.iterdir()) == []


def test_checksum_mismatch_names_both_digests_and_leaves_nothing(server, cache):
    base, root, _ = server
    (root / "data.sqlite").write_bytes(PAYLOAD)
    served = bytes([PAYLOAD[0] ^ 0xFF]) + PAYLOAD[1:]

    with pytest.raises(dl.DownloadError, match="SHA-256 mismatch") as info:
        dl.download(f"{base}/tampered/data.sqlite", sha256=sha256(PAYLOAD), cache_dir=cache,
                    progress=False)

    assert sha256(PAYLOAD) in str(info.value)
    assert sha256(served) in str(info.value)
    assert list(cache.iterdir()) == []


def test_size_is_checked_when_no_content_length_is_sent(server, cache):
    base, root, _ = server
    (root / "data.sqlite").write_bytes(PAYLOAD)
    url = f"{base}/nolength/data.sqlite"

    with pytest.raises(dl.DownloadError, match=f"expected {len(PAYLOAD) + 1}"):
        dl.download(url, size=len(PAYLOAD) + 1, cache_dir=cache, progress=False)
    assert list(cache.iterdir()) == []
    assert dl.download(url, size=len(PAYLOAD), cache_dir=cache, progress=False).read_bytes() \
        == PAYLOAD


def test_http_error_names_the_url_and_leaves_nothing(server, cache):
    base, _, _ = server
    url = f"{base}/good/missing.sqlite"
    with pytest.raises(dl.DownloadError, match="HTTP 404") as info:
        dl.download(url, cache_dir=cache, progress=False)
    assert url in str(info.value)
    assert list(cache.iterdir()) == []


def test_corrupt_cached_file_is_downloaded_again(server, cache):
    base, root, requests = server
    (root / "data.sqlite").write_bytes(PAYLOAD)
    url = f"{base}/good/data.sqlite"
    path = dl.download(url, sha256=sha256(PAYLOAD), cache_dir=cache, progress=False)
    mtime_ns = path.stat().st_mtime_ns
    path.write_bytes(b"x" + PAYLOAD[1:])  # Same size: only the digest can catch it.
    # File times tick coarsely (a jiffy), so make the rewrite visibly later, as any real one is.
    os.utime(path, ns=(mtime_ns + 10**9, mtime_ns + 10**9))

    with pytest.warns(UserWarning, match="expected " + sha256(PAYLOAD)):
        again = dl.download(url, sha256=sha256(PAYLOAD), cache_dir=cache, progress=False)

    assert again.read_bytes() == PAYLOAD
    assert len(requests) == 2


def test_verified_cache_is_not_rehashed(server, cache, monkeypatch):
    base, root, _ = server
    (root / "data.sqlite").write_bytes(PAYLOAD)
    url = f"{base}/good/data.sqlite"
    dl.download(url, sha256=sha256(PAYLOAD), cache_dir=cache, progress=False)

    def no_hashing(path):
        raise AssertionError(f"{path} was hashed again despite its verification stamp")

    monkeypatch.setattr(dl, "_sha256_of", no_hashing)
    assert dl.download(url, sha256=sha256(PAYLOAD), cache_dir=cache, progress=False).exists()


def test_lzma_registry_entry_is_downloaded_and_decompressed(server, cache, monkeypatch):
    base, root, requests = server
    archive = lzma.compress(PAYLOAD, format=lzma.FORMAT_ALONE)  # TFF's .lzma container.
    (root / "local.sqlite.lzma").write_bytes(archive)
    entry = dl.RemoteFile(f"{base}/good/local.sqlite.lzma", sha256(archive), len(archive))
    monkeypatch.setitem(dl.PUBLIC_FILES, "test/local", entry)

    path = dl.fetch("test/local", cache_dir=cache, progress=False)
    again = dl.fetch("test/local", cache_dir=cache, progress=False)

    assert path == again == cache / "test" / "local.sqlite"
    assert path.read_bytes() == PAYLOAD
    assert (cache / "test" / "local.sqlite.lzma").read_bytes() == archive
    assert len(requests) == 1
    assert not list(cache.rglob("*.part-*"))


@pytest.mark.parametrize("suffix, compress", [(".xz", lzma.compress), (".bz2", bz2.compress),
                                              (".gz", gzip.compress)])
def test_decompress_other_formats(tmp_path, suffix, compress):
    archive = tmp_path / f"data.sqlite{suffix}"
    archive.write_bytes(compress(PAYLOAD))
    assert dl.decompress(archive, progress=False).read_bytes() == PAYLOAD


def test_truncated_archive_fails_to_decompress_and_leaves_no_output(tmp_path):
    archive = tmp_path / "data.sqlite.lzma"
    archive.write_bytes(lzma.compress(PAYLOAD, format=lzma.FORMAT_ALONE)[:-20])
    with pytest.raises(dl.DownloadError, match="data.sqlite.lzma"):
        dl.decompress(archive, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.sqlite.lzma"]


def test_cache_dir_env_var_is_honoured(server, tmp_path, monkeypatch):
    base, root, _ = server
    (root / "data.sqlite").write_bytes(PAYLOAD)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv(dl.CACHE_ENV_VAR, raising=False)
    assert dl.cache_dir() == tmp_path / "home" / ".cache" / "fedjax_sim"

    monkeypatch.setenv(dl.CACHE_ENV_VAR, str(tmp_path / "env_cache"))
    assert dl.cache_dir() == tmp_path / "env_cache"
    path = dl.download(f"{base}/good/data.sqlite", progress=False)
    assert path == tmp_path / "env_cache" / "data.sqlite"
    assert path.read_bytes() == PAYLOAD


def test_fetch_unknown_name_lists_the_known_names():
    with pytest.raises(ValueError, match="unknown public file 'nope'") as info:
        dl.fetch("nope")
    for name in ("tff/emnist_all", "tff/cifar100", "fedjax/stackoverflow_train"):
        assert name in str(info.value)


def test_registry_entries_are_well_formed():
    hosts = ("https://storage.googleapis.com/tff-datasets-public/",
             "https://storage.googleapis.com/gresearch/fedjax/")
    for name, entry in dl.PUBLIC_FILES.items():
        assert entry.url.startswith(hosts), name
        assert entry.filename.endswith((".sqlite", ".sqlite.lzma")), name
        if entry.sha256 is not None:
            assert len(entry.sha256) == 64 and int(entry.sha256, 16) >= 0, name
    tff = [entry for name, entry in dl.PUBLIC_FILES.items() if name.startswith("tff/")]
    assert {entry.filename for entry in tff} == {
        "emnist_all.sqlite.lzma", "shakespeare.sqlite.lzma", "stackoverflow.sqlite.lzma",
        "cifar100.sqlite.lzma"}
