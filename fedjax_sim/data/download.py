"""Downloads public data files into a local cache, verified and renamed into place atomically.

A file is streamed to `<name>.part-<random>` in the cache directory while it is hashed, checked
against the announced Content-Length, the expected size and the SHA-256 (when known), and only
then renamed to `<name>` with `os.replace`. Any failure removes the partial file, so the cache
never holds a truncated or corrupt file under its final name, and concurrent downloads of the
same file cannot see each other's halves. Compressed archives (TFF serves its SQLite files as
`.sqlite.lzma`) are decompressed next to the archive the same way.

Example:
  >>> path = fetch("tff/shakespeare")  # doctest: +SKIP
  >>> path.name  # doctest: +SKIP
  'shakespeare.sqlite'
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import http.client
import lzma
import os
import secrets
import urllib.error
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

CACHE_ENV_VAR = "FEDJAX_SIM_CACHE"
_CHUNK = 1 << 20
_DECOMPRESSORS = {".lzma": lzma.open, ".xz": lzma.open, ".bz2": bz2.open, ".gz": gzip.open}


class DownloadError(OSError):
    """A download or decompression failed; no partial file was left in the cache."""


@dataclass(frozen=True)
class RemoteFile:
    """A public file: where it lives and, when published, what it must hash to.

    Attributes:
      url: HTTP(S) address of the file.
      sha256: expected SHA-256 hex digest, or None when no published digest could be confirmed
        (the download is then checked against Content-Length and `size` only).
      size: expected size in bytes, or None when unknown.
    """

    url: str
    sha256: str | None = None
    size: int | None = None

    @property
    def filename(self) -> str:
        """The last component of the URL's path, the name the file is cached under."""
        return _url_basename(self.url)


_TFF = "https://storage.googleapis.com/tff-datasets-public/"
_FEDJAX = "https://storage.googleapis.com/gresearch/fedjax/"

# Sources: TFF's `tensorflow_federated/python/simulation/datasets/{emnist,shakespeare,
# stackoverflow,cifar100}.py` (URLs; TFF publishes no digests for these files) and FedJAX's
# `fedjax/datasets/{emnist,shakespeare,stackoverflow}.py` (URLs; no digests either). The only
# digests published by the maintainers are FedJAX's: `cifar100.py` pins cifar100.sqlite.lzma
# and `downloads_test.py` pins shakespeare.sqlite.lzma. Every other entry has sha256=None and
# size=None, so it is verified against the server's Content-Length only: digests reported by
# third parties were not used because they could not be confirmed at the source.
PUBLIC_FILES: dict[str, RemoteFile] = {
    "tff/emnist_all": RemoteFile(_TFF + "emnist_all.sqlite.lzma"),
    "tff/shakespeare": RemoteFile(
        _TFF + "shakespeare.sqlite.lzma",
        sha256="d3d11fceb9e105439ac6f4d52af6efafed5a2a1e1eb24c5bd2dd54ced242f5c4",
        size=1_329_828,
    ),
    "tff/stackoverflow": RemoteFile(_TFF + "stackoverflow.sqlite.lzma"),
    "tff/cifar100": RemoteFile(
        _TFF + "cifar100.sqlite.lzma",
        sha256="23d3916c9caa33395737ee560cc7cb77bbd05fc7b73647ee7be3a7e764172939",
        size=153_019_920,
    ),
    "fedjax/emnist_train": RemoteFile(_FEDJAX + "emnist/federated_emnist_train.sqlite"),
    "fedjax/emnist_test": RemoteFile(_FEDJAX + "emnist/federated_emnist_test.sqlite"),
    "fedjax/emnist_digitsonly_train": RemoteFile(
        _FEDJAX + "emnist/federated_emnist_digitsonly_train.sqlite"),
    "fedjax/emnist_digitsonly_test": RemoteFile(
        _FEDJAX + "emnist/federated_emnist_digitsonly_test.sqlite"),
    "fedjax/shakespeare_train": RemoteFile(_FEDJAX + "shakespeare/shakespeare_train.sqlite"),
    "fedjax/shakespeare_test": RemoteFile(_FEDJAX + "shakespeare/shakespeare_test.sqlite"),
    "fedjax/stackoverflow_train": RemoteFile(_FEDJAX + "stackoverflow/stackoverflow_train.sqlite"),
    "fedjax/stackoverflow_held_out": RemoteFile(
        _FEDJAX + "stackoverflow/stackoverflow_held_out.sqlite"),
    "fedjax/stackoverflow_test": RemoteFile(_FEDJAX + "stackoverflow/stackoverflow_test.sqlite"),
}


def cache_dir() -> Path:
    """Returns the cache directory: `$FEDJAX_SIM_CACHE` if set, else `~/.cache/fedjax_sim`."""
    configured = os.environ.get(CACHE_ENV_VAR)
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "fedjax_sim"


def fetch(
    name: str,
    *,
    cache_dir: str | os.PathLike | None = None,
    extract: bool = True,
    progress: bool = True,
    timeout: float = 60.0,
) -> Path:
    """Downloads the public file `name` (a key of `PUBLIC_FILES`) unless it is cached.

    Files are cached under `<cache dir>/<source>/`, `<source>` being the part of `name` before
    the slash, so files of the same name from TFF and FedJAX cannot collide.

    Args:
      name: registry key, e.g. "tff/emnist_all" or "fedjax/stackoverflow_train".
      cache_dir: cache root; defaults to `cache_dir()`.
      extract: decompress a compressed archive and return the decompressed file.
      progress: show tqdm progress bars.
      timeout: socket timeout in seconds for each network operation.

    Returns:
      The path of the cached (and, with `extract`, decompressed) file.

    Raises:
      ValueError: `name` is not in the registry; the message lists the known names.
      DownloadError: the download or the decompression failed.
    """
    if name not in PUBLIC_FILES:
        raise ValueError(
            f"unknown public file {name!r}; known names: {', '.join(sorted(PUBLIC_FILES))}")
    remote = PUBLIC_FILES[name]
    directory = _directory(cache_dir) / name.partition("/")[0]
    archive = directory / remote.filename
    if extract and archive.suffix in _DECOMPRESSORS:
        # The decompressed file only ever appears by atomic rename, so its presence alone
        # proves it is complete; this skips re-verifying a possibly multi-GB archive.
        extracted = archive.with_suffix("")
        if extracted.exists():
            return extracted
    path = download(
        remote.url,
        sha256=remote.sha256,
        size=remote.size,
        cache_dir=directory,
        progress=progress,
        timeout=timeout,
    )
    if extract and path.suffix in _DECOMPRESSORS:
        return decompress(path, progress=progress)
    return path


def download(
    url: str,
    *,
    sha256: str | None = None,
    size: int | None = None,
    filename: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    timeout: float = 60.0,
) -> Path:
    """Returns the cached copy of `url`, downloading and verifying it first if needed.

    A cached file is reused without any network access when it has the expected `size` and
    `sha256` (those given); one that does not is downloaded again, with a warning.

    Args:
      url: the file's address.
      sha256: expected SHA-256 hex digest; None skips the digest check.
      size: expected size in bytes; None skips the size check (Content-Length is still checked).
      filename: name in the cache; defaults to the last component of the URL's path.
      cache_dir: cache directory; defaults to `cache_dir()`.
      progress: show a tqdm progress bar.
      timeout: socket timeout in seconds for each network operation.

    Returns:
      The path of the verified file in the cache.

    Raises:
      ValueError: no file name given and none can be derived from `url`.
      DownloadError: HTTP or network error, truncated download, wrong size, or SHA-256
        mismatch; the partial file has been removed.
    """
    sha256 = sha256.lower() if sha256 is not None else None
    name = filename or _url_basename(url)
    if not name:
        raise ValueError(f"cannot derive a file name from {url!r}; pass filename=")
    directory = _directory(cache_dir)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / name
    if target.exists():
        problem = _cached_problem(target, sha256, size)
        if problem is None:
            return target
        warnings.warn(f"cached {target} {problem}; downloading {url} again", stacklevel=2)

    part = target.with_name(f"{name}.part-{secrets.token_hex(6)}")
    try:
        actual = _stream(url, part, size, progress, timeout)
        if sha256 is not None and actual != sha256:
            raise DownloadError(
                f"SHA-256 mismatch for {url}: expected {sha256}, got {actual}; "
                "the download was discarded")
        os.replace(part, target)
    except BaseException:
        # Also on KeyboardInterrupt: an interrupted download must not leave its half behind.
        part.unlink(missing_ok=True)
        raise
    if sha256 is not None:
        _write_stamp(target, sha256)
    return target


def decompress(path: str | os.PathLike, *, progress: bool = True) -> Path:
    """Decompresses a `.lzma`/`.xz`/`.bz2`/`.gz` file next to itself, minus the suffix.

    The output is written to a `.part-<random>` file and renamed into place, so it exists only
    when complete; an existing output is returned as is.

    Args:
      path: the compressed file.
      progress: show a tqdm progress bar (over the compressed bytes).

    Returns:
      The path of the decompressed file.

    Raises:
      ValueError: the suffix is not a supported compression format.
      DownloadError: the archive is corrupt or truncated; no output was left behind.
    """
    path = Path(path)
    opener = _DECOMPRESSORS.get(path.suffix)
    if opener is None:
        raise ValueError(
            f"{path}: cannot decompress suffix {path.suffix!r}; supported: "
            f"{', '.join(_DECOMPRESSORS)}")
    target = path.with_suffix("")
    if target.exists():
        return target
    part = target.with_name(f"{target.name}.part-{secrets.token_hex(6)}")
    try:
        with (
            open(path, "rb") as raw,
            opener(raw, "rb") as source,
            open(part, "xb") as sink,
            tqdm(total=path.stat().st_size, unit="B", unit_scale=True, unit_divisor=1024,
                 desc=f"decompressing {path.name}", disable=not progress) as bar,
        ):
            while chunk := source.read(_CHUNK):
                sink.write(chunk)
                bar.update(raw.tell() - bar.n)
        os.replace(part, target)
    except (lzma.LZMAError, EOFError, OSError) as exc:
        part.unlink(missing_ok=True)
        raise DownloadError(
            f"decompressing {path} failed: {exc}; if the archive is corrupt, delete it so that "
            "it is downloaded again") from exc
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    return target


def _stream(url: str, part: Path, size: int | None, progress: bool, timeout: float) -> str:
    """Streams `url` into the new file `part`; returns its SHA-256 after the length checks."""
    hasher = hashlib.sha256()
    received = 0
    announced = None
    request = urllib.request.Request(url, headers={"User-Agent": "fedjax_sim"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response, open(part, "xb") as out:
            length = response.headers.get("Content-Length")
            announced = int(length) if length is not None else None
            with tqdm(total=announced or size, unit="B", unit_scale=True, unit_divisor=1024,
                      desc=_url_basename(url), disable=not progress) as bar:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    hasher.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as exc:
        raise DownloadError(f"downloading {url} failed: HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        raise DownloadError(
            f"downloading {url} failed after {received} of {announced or 'unknown'} bytes: "
            f"{exc}") from exc
    # http.client returns b"" rather than raising when the server closes the connection early
    # (see HTTPResponse.read), so a short body has to be detected here.
    if announced is not None and received != announced:
        raise DownloadError(
            f"truncated download of {url}: received {received} bytes, but Content-Length "
            f"announced {announced} (the connection closed early)")
    if size is not None and received != size:
        raise DownloadError(f"wrong size for {url}: received {received} bytes, expected {size}")
    return hasher.hexdigest()


def _cached_problem(path: Path, sha256: str | None, size: int | None) -> str | None:
    """Returns why the cached `path` is unusable, or None when it is the expected file."""
    stat = path.stat()
    if size is not None and stat.st_size != size:
        return f"has {stat.st_size} bytes, expected {size}"
    if sha256 is None or _read_stamp(path) == _stamp(stat, sha256):
        return None
    actual = _sha256_of(path)
    if actual != sha256:
        return f"has SHA-256 {actual}, expected {sha256}"
    _write_stamp(path, sha256)
    return None


# Hashing a multi-GB file on every load would dominate start-up, so a verified file gets a
# `<name>.sha256` stamp recording its digest, size and mtime; the digest is recomputed only when
# the file's size or mtime no longer match the stamp.
def _stamp(stat: os.stat_result, sha256: str) -> str:
    return f"{sha256} {stat.st_size} {stat.st_mtime_ns}\n"


def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _read_stamp(path: Path) -> str | None:
    try:
        return _stamp_path(path).read_text()
    except OSError:
        return None


def _write_stamp(path: Path, sha256: str) -> None:
    _stamp_path(path).write_text(_stamp(path.stat(), sha256))


def _sha256_of(path: Path) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_CHUNK):
            hasher.update(chunk)
    return hasher.hexdigest()


def _url_basename(url: str) -> str:
    return urllib.parse.unquote(urllib.parse.urlparse(url).path.rpartition("/")[2])


def _directory(explicit: str | os.PathLike | None) -> Path:
    return Path(explicit).expanduser() if explicit is not None else cache_dir()
