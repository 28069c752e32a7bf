"""Where dataset files live, and how a missing one is fetched and verified.

Every file a loader needs is a :class:`RemoteFile` with its published size and
digest. :func:`fetch` returns its local path after making sure the bytes are
the published ones: a file already on disk is hashed on every load (cheap
next to decoding it); a missing file is downloaded to a temporary file in the same folder,
hashed while it streams, and only renamed into place once the digest matches,
so a crash or a bad mirror never leaves a half-written or wrong file behind;
folders a failed download created are removed again once empty. A failure
names, on one line, every URL tried and why it failed.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from downpour.errors import DataError

logger = logging.getLogger(__name__)

_CHUNK_BYTES = 1 << 20
_TIMEOUT_S = 60.0

# Base URLs per dataset folder, tried in order; a file's URL is base + "/" + name.
# Tests and users with a local copy may replace entries (or pass mirror=).
MIRRORS: dict[str, list[str]] = {
    "mnist": [
        "https://ossci-datasets.s3.amazonaws.com/mnist",
        "http://yann.lecun.com/exdb/mnist",
    ],
    "fashion-mnist": [
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com",
    ],
    "cifar10": [
        "https://www.cs.toronto.edu/~kriz",
    ],
    "w8a": [
        "https://www.csie.ntu.edu.tw/~cjlin/libsvmtools/datasets/binary",
    ],
}


@dataclass(frozen=True, kw_only=True)
class RemoteFile:
    """One published dataset file: its name, size and digests.

    Attributes:
        name: File name, both upstream and on disk.
        size: Size in bytes, or None when unpublished.
        sha256: Hex SHA-256 digest, or None when unpublished.
        md5: Hex MD5 digest, or None when unpublished.

    Example:
        >>> RemoteFile(name="w8a", size=3478239, sha256="b464...").name
        'w8a'
    """

    name: str
    size: int | None = None
    sha256: str | None = None
    md5: str | None = None

    def __post_init__(self) -> None:
        if self.sha256 is None and self.md5 is None:
            raise ValueError(f"remote file {self.name!r} needs a sha256 or md5 digest")

    @property
    def expected(self) -> str:
        """The digest we check, as ``algorithm:hex`` (SHA-256 when published)."""
        return f"sha256:{self.sha256}" if self.sha256 else f"md5:{self.md5}"


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The root folder holding one subfolder per dataset.

    Args:
        data_dir: Explicit folder; wins when given.

    Returns:
        ``data_dir`` if given, else ``$DOWNPOUR_DATA`` if set, else
        ``$XDG_CACHE_HOME/downpour`` or ``~/.cache/downpour``. Nothing is created.

    Example:
        >>> resolve_data_dir("/data")
        PosixPath('/data')
    """
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = os.environ.get("DOWNPOUR_DATA")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME")
    base = Path(cache) if cache and os.path.isabs(cache) else Path.home() / ".cache"
    return base / "downpour"


def fetch(
    dataset: str,
    remote: RemoteFile,
    folder: Path,
    *,
    download: bool,
    mirror: str | None = None,
) -> Path:
    """Return ``folder / remote.name``, verified, downloading it if missing.

    Args:
        dataset: Key into :data:`MIRRORS` (also the folder name mirrors use).
        remote: The file and its published digest.
        folder: Local folder for this dataset.
        download: Whether a missing file may be downloaded.
        mirror: A base URL holding the file, tried before everything else.
            ``$DOWNPOUR_MIRROR`` names a root laid out like the data directory
            (``$DOWNPOUR_MIRROR/<dataset>/<name>``) and is tried next.

    Raises:
        DataError: The file is missing and may not or could not be downloaded
            (the message names each URL tried and its error, on one line), or
            its bytes do not match the published digest.

    Example:
        >>> remote = RemoteFile(name="w8a", size=3478239, sha256="b464...")
        >>> fetch("w8a", remote, Path("data/w8a"), download=True)  # doctest: +SKIP
        PosixPath('/home/me/data/w8a/w8a')
    """
    path = (folder / remote.name).absolute()
    if path.is_file():
        verify_local(path, remote)
        return path
    hint = _data_dir_hint(folder)
    if not download:
        raise DataError(
            f"{dataset}: missing {path} (expected {remote.name}, {remote.expected}); "
            f"pass download=True or copy the file there{hint}"
        )
    urls = [f"{base.rstrip('/')}/{remote.name}" for base in mirror_bases(dataset, mirror)]
    failures: list[str] = []
    created = _missing_folders(path.parent)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for url in urls:
            try:
                _download(url, path, remote)
                return path
            except DataError as error:
                failures.append(str(error))
    except OSError as error:  # from mkdir: _download raises only DataError
        failures.append(f"cannot create {path.parent}: {error}")
    finally:
        if not path.is_file():  # failed or interrupted: leave the data folder as we found it
            _remove_empty(created)
    if not failures:
        failures.append(
            f"no mirror is configured for {dataset!r}; pass mirror= or set $DOWNPOUR_MIRROR"
        )
    tried = "; ".join(f"({number}) {failure}" for number, failure in enumerate(failures, start=1))
    raise DataError(
        f"{dataset}: could not download {remote.name} ({remote.expected}) to {path}: {tried}{hint}"
    )


def _missing_folders(folder: Path) -> list[Path]:
    """``folder`` and its ancestors that do not exist yet, deepest first."""
    missing = []
    while not folder.exists() and folder.parent != folder:
        missing.append(folder)
        folder = folder.parent
    return missing


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders a failed download created, deepest first, while they are empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty (another process put a file there) or already gone
            return


def _data_dir_hint(folder: Path) -> str:
    """A note for a relative data folder that does not exist: likely the wrong one.

    ``--data-dir ../shared/data`` run from another folder than intended names a
    folder that is not there; downloading into a fresh copy of it would be
    the wrong fix, so the message says where the path was taken from.
    """
    data_dir = folder.parent
    if folder.is_absolute() or data_dir == Path() or data_dir.exists():
        return ""
    return (
        f"; the data folder {str(data_dir)!r} does not exist here ({os.getcwd()}): "
        "if the files are elsewhere, check --data-dir or $DOWNPOUR_DATA"
    )


def mirror_bases(dataset: str, mirror: str | None = None) -> list[str]:
    """The base URLs tried for ``dataset``, in order (see :func:`fetch`)."""
    bases = [mirror] if mirror else []
    root = os.environ.get("DOWNPOUR_MIRROR")
    if root:
        bases.append(f"{root.rstrip('/')}/{dataset}")
    return bases + MIRRORS.get(dataset, [])


def verify_local(path: Path, remote: RemoteFile) -> None:
    """Check a file on disk against ``remote``: its size, then its digest.

    Hashing on every load costs about 10 ms per 10 MB, small next to
    decompressing the file, and needs no marker files in a data folder that
    may be shared or read-only.

    Raises:
        DataError: Size or digest differ from the published ones.
    """
    stat = path.stat()
    if remote.size is not None and stat.st_size != remote.size:
        raise DataError(
            f"corrupt file {path}: {stat.st_size} bytes, expected {remote.size} "
            f"({remote.expected}); delete it to download it again"
        )
    actual = _digest_file(path, remote)
    if actual != remote.expected:
        raise DataError(
            f"corrupt file {path}: expected {remote.expected}, got {actual}; "
            "delete it to download it again"
        )


def _digest_file(path: Path, remote: RemoteFile) -> str:
    algorithm = "sha256" if remote.sha256 else "md5"
    hasher = hashlib.new(algorithm)
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            hasher.update(chunk)
    return f"{algorithm}:{hasher.hexdigest()}"


def _download(url: str, path: Path, remote: RemoteFile) -> None:
    """Stream ``url`` into a temp file beside ``path``; rename into place only if it verifies.

    Raises:
        DataError: ``"<url>: <why>"``, the underlying error (or the expected and
            actual digests) stated; nothing is left behind.
    """
    algorithm = "sha256" if remote.sha256 else "md5"
    hasher = hashlib.new(algorithm)
    try:
        fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    except OSError as error:
        raise DataError(f"{url}: cannot write into {path.parent}: {error}") from error
    temp = Path(temp_name)
    logger.info("downloading %s to %s", url, path)
    try:
        with (
            os.fdopen(fd, "wb") as handle,
            urllib.request.urlopen(url, timeout=_TIMEOUT_S) as response,
        ):
            while chunk := response.read(_CHUNK_BYTES):
                hasher.update(chunk)
                handle.write(chunk)
        actual = f"{algorithm}:{hasher.hexdigest()}"
        if actual != remote.expected:
            raise DataError(
                f"{url}: checksum mismatch: expected {remote.expected}, got {actual} (discarded)"
            )
        os.chmod(temp, 0o644)  # mkstemp makes it owner-only; a data cache is for everyone
        os.replace(temp, path)
    except (OSError, ValueError, http.client.HTTPException) as error:
        if isinstance(error, DataError):
            raise
        logger.debug("downloading %s failed", url, exc_info=True)
        raise DataError(f"{url}: {_reason(error)}") from error
    finally:
        temp.unlink(missing_ok=True)  # gone already after a successful rename


def _reason(error: BaseException) -> str:
    """What went wrong, without urllib's wrapping: ``[Errno -2] Name or service not known``."""
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP Error {error.code}: {error.reason}"
    cause: object = error.reason if isinstance(error, urllib.error.URLError) else error
    if isinstance(cause, TimeoutError) and not getattr(cause, "errno", None):
        return f"timed out after {_TIMEOUT_S:g} s"
    text = str(cause)
    if isinstance(cause, BaseException) and not text:
        return type(cause).__name__
    return text
