"""The IDX loader, the data search order, downloads with checksums, and the errors a user sees.

No test touches the network: `no_network` replaces the real fetcher, and downloads are tested from
file:// mirrors the tests write.
"""

from __future__ import annotations

import gzip
import hashlib
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from adaptopt.experiments import cli, data

TRAIN_SIZE, TEST_SIZE = 320, 120
original_fetcher = data.urllib_fetcher  # the real one, kept before the fixture replaces it


def write_idx(path: Path, array: np.ndarray, *, compress: bool) -> Path:
    """An IDX file of unsigned bytes (magic 0x0000080N), gzipped when `compress`."""
    payload = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload += np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(payload, mtime=0) if compress else payload)
    return path


def make_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Noise plus a bright 7x7 square whose place encodes the label, so the CNN has something to learn."""
    images = rng.integers(0, 60, size=(len(labels), 28, 28), dtype=np.uint8)
    for index, label in enumerate(labels):
        row, column = divmod(int(label), 4)
        images[index, 7 * row : 7 * row + 7, 7 * column : 7 * column + 7] = 250
    return images


def write_dataset(directory: Path, *, compress: bool = True, seed: int = 0) -> dict[str, Path]:
    """The four files of a small MNIST-format dataset in `directory`; returns them by role."""
    rng = np.random.default_rng(seed)
    train_labels = rng.integers(0, 10, size=TRAIN_SIZE, dtype=np.uint8)
    test_labels = rng.integers(0, 10, size=TEST_SIZE, dtype=np.uint8)
    arrays = {
        "train_images": make_images(train_labels, rng),
        "train_labels": train_labels,
        "test_images": make_images(test_labels, rng),
        "test_labels": test_labels,
    }
    suffix = ".gz" if compress else ""
    return {
        role: write_idx(directory / (data.FILE_NAMES[role] + suffix), array, compress=compress)
        for role, array in arrays.items()
    }


def refuse_network(url: str, destination: Path) -> None:
    raise OSError(f"network disabled in tests: {url}")


@pytest.fixture(autouse=True)
def isolated_data_locations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Empty cache and system dirs, no $ADAPTOPT_DATA and no network, whatever this machine has installed."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("ADAPTOPT_DATA", raising=False)
    monkeypatch.setattr(data, "SYSTEM_DATA_DIRS", (tmp_path / "system",))
    monkeypatch.setattr(data, "urllib_fetcher", refuse_network)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Training on one thread: measured 4-8x faster than two while other processes share the 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("compress", [True, False], ids=["gzip", "raw"])
def test_read_idx_returns_what_was_written(tmp_path: Path, compress: bool) -> None:
    array = np.arange(3 * 28 * 28, dtype=np.int64).reshape(3, 28, 28) % 256
    path = write_idx(tmp_path / "images", array, compress=compress)
    assert np.array_equal(data.read_idx(path, expected_ndim=3), array)


@pytest.mark.parametrize("compress", [True, False], ids=["gzip", "raw"])
def test_load_dataset_from_data_dir(tmp_path: Path, compress: bool) -> None:
    files = write_dataset(tmp_path / "mine", compress=compress)
    loaded = data.load_dataset("mnist", tmp_path / "mine")
    assert loaded.train_images.shape == (TRAIN_SIZE, 1, 28, 28)
    assert loaded.test_images.shape == (TEST_SIZE, 1, 28, 28)
    assert loaded.train_labels.dtype == torch.int64
    expected_labels = data.read_idx(files["train_labels"])
    assert torch.equal(loaded.train_labels, torch.from_numpy(expected_labels.astype(np.int64)))
    # Normalised by the training set's own statistics.
    assert abs(loaded.train_images.mean().item()) < 1e-5
    assert loaded.train_images.std().item() == pytest.approx(1.0, rel=1e-4)
    assert loaded.file_sha256["train_images"] == hashlib.sha256(files["train_images"].read_bytes()).hexdigest()


def test_search_order_data_dir_then_environment_then_cache_then_system(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for seed, root in enumerate(["system", "cache/adaptopt", "environment", "explicit"]):
        write_dataset(tmp_path / root / "fashion-mnist", seed=seed)
    monkeypatch.setenv("ADAPTOPT_DATA", str(tmp_path / "environment"))
    assert data.load_dataset("fashion-mnist", tmp_path / "explicit").directory == tmp_path / "explicit/fashion-mnist"
    assert data.load_dataset("fashion-mnist").directory == tmp_path / "environment/fashion-mnist"
    monkeypatch.delenv("ADAPTOPT_DATA")
    assert data.load_dataset("fashion-mnist").directory == tmp_path / "cache/adaptopt/fashion-mnist"
    (tmp_path / "cache/adaptopt/fashion-mnist/train-images-idx3-ubyte.gz").unlink()
    assert data.load_dataset("fashion-mnist").directory == tmp_path / "system/fashion-mnist"


@pytest.mark.parametrize("compress", [True, False], ids=["gzip", "raw"])
def test_truncated_file_names_the_file(tmp_path: Path, compress: bool) -> None:
    files = write_dataset(tmp_path, compress=compress)
    content = files["test_images"].read_bytes()
    files["test_images"].write_bytes(content[: len(content) // 2])
    with pytest.raises(data.DataError, match="t10k-images-idx3-ubyte") as raised:
        data.load_dataset("mnist", tmp_path)
    assert "truncated" in str(raised.value) or "cannot read" in str(raised.value)
    assert "replace it with the official file" in str(raised.value)


def test_wrong_magic_names_the_file(tmp_path: Path) -> None:
    files = write_dataset(tmp_path, compress=False)
    # A labels file where an images file belongs: one dimension instead of three.
    files["train_images"].write_bytes(files["train_labels"].read_bytes())
    with pytest.raises(data.DataError, match=r"train-images-idx3-ubyte: not an IDX file.*expected 0x00000803"):
        data.load_dataset("mnist", tmp_path)


def test_mismatched_image_and_label_counts(tmp_path: Path) -> None:
    files = write_dataset(tmp_path, compress=False)
    write_idx(files["test_labels"], np.zeros(TEST_SIZE - 1, dtype=np.uint8), compress=False)
    with pytest.raises(data.DataError, match=f"{TEST_SIZE} images but .* has {TEST_SIZE - 1} labels"):
        data.load_dataset("mnist", tmp_path)


def test_missing_data_offline_message(tmp_path: Path) -> None:
    with pytest.raises(data.DataError) as raised:
        data.load_dataset("mnist", tmp_path / "nowhere", fetcher=refuse_network)
    message = str(raised.value)
    assert "No MNIST data found, and downloading it failed (offline?)" in message
    assert "network disabled in tests" in message
    assert str(tmp_path / "nowhere") in message
    assert "apt-get install -y dataset-fashion-mnist" in message
    assert "--dataset fashion-mnist" in message


def test_cli_missing_data_prints_message_and_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = cli.main(["mnist", "--dataset", "fashion-mnist", "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert status == 1
    assert "No Fashion-MNIST data found" in captured.err
    assert "apt-get install -y dataset-fashion-mnist" in captured.err
    assert "Traceback" not in captured.err


def test_cli_corrupt_file_prints_message_and_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = write_dataset(tmp_path / "data")
    files["train_labels"].write_bytes(b"\x1f\x8b\x08\x00garbage")
    status = cli.main(["mnist", "--dataset", "mnist", "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path)])
    captured = capsys.readouterr()
    assert status == 1
    assert f"{files['train_labels']}: cannot read the file" in captured.err
    assert "Traceback" not in captured.err


def _file_mirror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, corrupt_md5: bool = False) -> Path:
    """Serve a written dataset as MNIST's mirror over file://, with its MD5s as the official ones."""
    mirror = tmp_path / "mirror"
    files = write_dataset(mirror)
    md5 = {role: hashlib.md5(path.read_bytes()).hexdigest() for role, path in files.items()}
    if corrupt_md5:
        md5["test_labels"] = "0" * 32
    spec = data.DatasetSpec("mnist", "MNIST", mirrors=(mirror.as_uri() + "/",), md5=md5)
    monkeypatch.setitem(data.DATASETS, "mnist", spec)
    return mirror


def test_download_from_mirror_then_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _file_mirror(tmp_path, monkeypatch)
    fetched: list[str] = []

    def fetch(url: str, destination: Path) -> None:
        assert url.startswith("file://")
        fetched.append(url)
        original_fetcher(url, destination)

    loaded = data.load_dataset("mnist", fetcher=fetch)
    cache = tmp_path / "cache/adaptopt/mnist"
    assert loaded.directory == cache
    assert len(fetched) == 4
    # Found in the cache the second time; a truncated cached file is fetched again, alone.
    assert data.load_dataset("mnist", fetcher=fetch).directory == cache
    assert len(fetched) == 4
    truncated = cache / "train-images-idx3-ubyte.gz"
    truncated.write_bytes(truncated.read_bytes()[:1000])
    assert data.load_dataset("mnist", fetcher=fetch).train_images.shape == (TRAIN_SIZE, 1, 28, 28)
    assert fetched[4:] == [fetched[0]]


def test_download_with_wrong_checksum_is_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _file_mirror(tmp_path, monkeypatch, corrupt_md5=True)
    with pytest.raises(data.DataError, match=r"t10k-labels-idx1-ubyte.gz: MD5 [0-9a-f]{32}, expected 0{32}"):
        data.load_dataset("mnist", fetcher=original_fetcher)
    assert not (tmp_path / "cache/adaptopt/mnist/t10k-labels-idx1-ubyte.gz").exists()


def test_default_dataset_falls_back_to_fashion_mnist(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_dataset(tmp_path / "system" / "fashion-mnist")
    assert data.resolve_default_dataset(None, fetcher=refuse_network)[0] == "fashion-mnist"
    assert cli.main(["data"]) == 0
    output = capsys.readouterr().out
    assert "dataset: Fashion-MNIST (MNIST is not available here and could not be downloaded" in output
    assert f"fashion-mnist {tmp_path / 'system' / 'fashion-mnist'}" in output
    write_dataset(tmp_path / "system" / "mnist")
    assert data.resolve_default_dataset(None, fetcher=refuse_network) == ("mnist", "MNIST found locally")
