"""Fetching files from a real HTTP server on 127.0.0.1: success, corruption, 404, offline."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch

from downpour.data import download, load, resolve_data_dir
from downpour.data.download import RemoteFile, fetch
from downpour.data.vision import FILES
from downpour.errors import DataError

LABELS = FILES["mnist"]["test_labels"]  # 4,542 bytes: the smallest real file


def _publish(http_root, shared_data: Path, dataset: str, names) -> str:
    root, base = http_root
    (root / dataset).mkdir(exist_ok=True)
    for name in names:
        shutil.copy(shared_data / dataset / name, root / dataset / name)
    return base


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_download_then_load_mnist(http_root, shared_data, tmp_path, monkeypatch):
    base = _publish(http_root, shared_data, "mnist", [r.name for r in FILES["mnist"].values()])
    monkeypatch.setitem(download.MIRRORS, "mnist", [f"{base}/mnist"])
    data = load("mnist", data_dir=tmp_path / "data")
    assert data.x_train.shape == (60000, 1, 28, 28)
    # Exactly the four files, no temporary files or other caches.
    assert _leftovers(tmp_path / "data" / "mnist") == sorted(
        r.name for r in FILES["mnist"].values()
    )
    # Second load reads from disk: no server needed.
    monkeypatch.setitem(download.MIRRORS, "mnist", [])
    again = load("mnist", data_dir=tmp_path / "data", download=False)
    assert torch.equal(again.y_test, data.y_test)


def test_first_mirror_404_falls_back_to_next(http_root, shared_data, tmp_path, monkeypatch):
    base = _publish(http_root, shared_data, "mnist", [LABELS.name])
    monkeypatch.setitem(download.MIRRORS, "mnist", [f"{base}/nowhere", f"{base}/mnist"])
    path = fetch("mnist", LABELS, tmp_path / "mnist", download=True)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == LABELS.sha256


def test_mirror_option_and_environment(http_root, shared_data, tmp_path, monkeypatch):
    base = _publish(http_root, shared_data, "mnist", [LABELS.name])
    monkeypatch.setitem(download.MIRRORS, "mnist", [])
    assert fetch("mnist", LABELS, tmp_path / "a", download=True, mirror=f"{base}/mnist").is_file()
    # $DOWNPOUR_MIRROR is a root laid out like the data directory.
    monkeypatch.setenv("DOWNPOUR_MIRROR", base)
    assert fetch("mnist", LABELS, tmp_path / "b", download=True).is_file()


def test_checksum_mismatch_leaves_nothing(http_root, shared_data, tmp_path, monkeypatch):
    root, base = http_root
    (root / "mnist").mkdir()
    blob = bytearray((shared_data / "mnist" / LABELS.name).read_bytes())
    blob[100] ^= 0xFF
    (root / "mnist" / LABELS.name).write_bytes(bytes(blob))
    monkeypatch.setitem(download.MIRRORS, "mnist", [f"{base}/mnist"])
    folder = tmp_path / "mnist"
    with pytest.raises(DataError) as caught:
        fetch("mnist", LABELS, folder, download=True)
    message = str(caught.value)
    assert LABELS.name in message and "checksum mismatch" in message
    actual = hashlib.sha256(bytes(blob)).hexdigest()
    assert f"expected sha256:{LABELS.sha256}, got sha256:{actual}" in message
    assert _leftovers(folder) == []


def test_404_is_a_data_error(http_root, tmp_path, monkeypatch):
    _, base = http_root
    monkeypatch.setitem(download.MIRRORS, "mnist", [f"{base}/mnist"])
    folder = tmp_path / "mnist"
    with pytest.raises(DataError, match="404") as caught:
        fetch("mnist", LABELS, folder, download=True)
    assert str(folder / LABELS.name) in str(caught.value)
    assert _leftovers(folder) == []


def test_unreachable_server_is_a_data_error(tmp_path, monkeypatch):
    monkeypatch.setitem(download.MIRRORS, "mnist", ["http://127.0.0.1:9/mnist"])
    with pytest.raises(DataError, match="could not download"):
        fetch("mnist", LABELS, tmp_path / "mnist", download=True)


def test_failure_names_every_url_and_its_error_on_one_line(http_root, tmp_path, monkeypatch):
    _, base = http_root
    urls = [
        f"https://mirror.invalid/mnist/{LABELS.name}",  # no such host (RFC 2606)
        f"http://127.0.0.1:9/mnist/{LABELS.name}",  # nothing listens on the discard port
        f"{base}/nowhere/{LABELS.name}",  # 404
    ]
    monkeypatch.setitem(download.MIRRORS, "mnist", [url.rsplit("/", 1)[0] for url in urls])
    with pytest.raises(DataError) as caught:
        fetch("mnist", LABELS, tmp_path / "mnist", download=True)
    message = str(caught.value)
    # The CLI prints the first line only: the reasons must be on it.
    assert "\n" not in message
    assert message.startswith(f"mnist: could not download {LABELS.name} (sha256:{LABELS.sha256})")
    # Each URL with the underlying error, unwrapped from urllib's "<urlopen error ...>".
    assert f"(1) {urls[0]}: [Errno " in message
    assert f"(2) {urls[1]}: [Errno 111] Connection refused" in message
    assert f"(3) {urls[2]}: HTTP Error 404: File not found" in message
    assert "urlopen error" not in message


def test_no_mirror_says_how_to_add_one(tmp_path, monkeypatch):
    monkeypatch.setitem(download.MIRRORS, "mnist", [])
    with pytest.raises(DataError, match=r"no mirror is configured for 'mnist'.*DOWNPOUR_MIRROR"):
        fetch("mnist", LABELS, tmp_path / "data" / "mnist", download=True)
    assert not (tmp_path / "data").exists()


def test_failure_removes_the_folders_it_created(tmp_path, monkeypatch):
    monkeypatch.setitem(download.MIRRORS, "mnist", ["http://127.0.0.1:9/mnist"])
    with pytest.raises(DataError):
        load("mnist", data_dir=tmp_path / "fresh" / "data")
    # Neither the dataset folder nor the data folder above it stays behind, empty.
    assert _leftovers(tmp_path) == []


def test_failure_keeps_folders_and_files_that_were_there(http_root, tmp_path, monkeypatch):
    _, base = http_root
    monkeypatch.setitem(download.MIRRORS, "mnist", [f"{base}/nowhere"])
    data = tmp_path / "data"
    (data / "mnist").mkdir(parents=True)
    (data / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="404"):
        fetch("mnist", LABELS, data / "mnist", download=True)
    assert _leftovers(data) == ["mnist", "notes.txt"]
    assert _leftovers(data / "mnist") == []  # an empty folder we did not make stays


def test_failure_stops_removing_at_the_first_folder_that_existed(tmp_path, monkeypatch):
    monkeypatch.setitem(download.MIRRORS, "mnist", ["http://127.0.0.1:9/mnist"])
    (tmp_path / "data").mkdir()
    with pytest.raises(DataError):
        fetch("mnist", LABELS, tmp_path / "data" / "mnist" / "deeper", download=True)
    assert _leftovers(tmp_path) == ["data"]
    assert _leftovers(tmp_path / "data") == []


def test_interrupted_download_leaves_nothing(tmp_path, monkeypatch):
    def interrupt(url, path, remote):
        assert path.parent.is_dir()  # fetch made the folders; Ctrl-C comes mid-download
        raise KeyboardInterrupt

    monkeypatch.setattr(download, "_download", interrupt)
    monkeypatch.setitem(download.MIRRORS, "mnist", ["http://127.0.0.1:9/mnist"])
    with pytest.raises(KeyboardInterrupt):
        fetch("mnist", LABELS, tmp_path / "data" / "mnist", download=True)
    assert _leftovers(tmp_path) == []


def test_relative_data_dir_that_does_not_exist_gets_a_hint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(download.MIRRORS, "mnist", ["http://127.0.0.1:9/mnist"])
    with pytest.raises(DataError) as caught:
        load("mnist", data_dir="../shared/data")
    message = str(caught.value)
    assert "\n" not in message
    assert "[Errno 111] Connection refused" in message
    assert f"the data folder '../shared/data' does not exist here ({tmp_path})" in message
    assert "check --data-dir or $DOWNPOUR_DATA" in message
    assert _leftovers(tmp_path) == [] and not (tmp_path.parent / "shared").exists()
    # The same hint when downloads are off, and for a relative $DOWNPOUR_DATA.
    monkeypatch.setenv("DOWNPOUR_DATA", "elsewhere/data")
    with pytest.raises(DataError, match=r"missing .*'elsewhere/data' does not exist.*--data-dir"):
        load("mnist", download=False)


@pytest.mark.parametrize("where", ["absolute", "existing"])
def test_no_hint_for_an_absolute_or_existing_data_dir(where, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(download.MIRRORS, "mnist", ["http://127.0.0.1:9/mnist"])
    if where == "existing":
        (tmp_path / "data").mkdir()
        data_dir = "data"
    else:
        data_dir = str(tmp_path / "absent")
    with pytest.raises(DataError) as caught:
        load("mnist", data_dir=data_dir)
    assert "--data-dir" not in str(caught.value)


def test_missing_without_download_names_the_path(tmp_path):
    with pytest.raises(DataError) as caught:
        load("mnist", data_dir=tmp_path, download=False)
    message = str(caught.value)
    assert str(tmp_path / "mnist" / "train-images-idx3-ubyte.gz") in message
    assert FILES["mnist"]["train_images"].sha256 in message


def test_corrupt_local_file_is_detected(shared_data, tmp_path):
    folder = tmp_path / "mnist"
    folder.mkdir()
    blob = bytearray((shared_data / "mnist" / LABELS.name).read_bytes())
    blob[-10] ^= 0x01
    (folder / LABELS.name).write_bytes(bytes(blob))
    with pytest.raises(DataError, match="corrupt file .*t10k-labels"):
        fetch("mnist", LABELS, folder, download=False)
    (folder / LABELS.name).write_bytes(bytes(blob[:-1]))
    with pytest.raises(DataError, match="4541 bytes, expected 4542"):
        fetch("mnist", LABELS, folder, download=False)


def test_md5_only_file(http_root, tmp_path, monkeypatch):
    root, base = http_root
    (root / "x").mkdir()
    (root / "x" / "f.bin").write_bytes(b"hello")
    remote = RemoteFile(name="f.bin", md5=hashlib.md5(b"hello").hexdigest())
    monkeypatch.setitem(download.MIRRORS, "x", [f"{base}/x"])
    assert fetch("x", remote, tmp_path, download=True).read_bytes() == b"hello"
    with pytest.raises(ValueError, match="needs a sha256 or md5"):
        RemoteFile(name="nothing")


def test_resolve_data_dir(monkeypatch, tmp_path):
    assert resolve_data_dir(tmp_path) == tmp_path
    monkeypatch.setenv("DOWNPOUR_DATA", str(tmp_path / "env"))
    assert resolve_data_dir() == tmp_path / "env"
    assert resolve_data_dir("explicit") == Path("explicit")
    monkeypatch.delenv("DOWNPOUR_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert resolve_data_dir() == tmp_path / "cache" / "downpour"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_data_dir() == tmp_path / "home" / ".cache" / "downpour"
