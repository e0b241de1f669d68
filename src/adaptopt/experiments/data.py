"""MNIST and Fashion-MNIST: IDX files, where to find them, and how to fetch them.

The four files of each dataset are the official IDX files (`train-images-idx3-ubyte[.gz]`, ...), gzipped or
raw. They are looked for, in this order, in

1. `--data-dir` (the files directly in it, or in its `<dataset>/` subdirectory),
2. `$ADAPTOPT_DATA/<dataset>/`,
3. the per-user cache, `$XDG_CACHE_HOME/adaptopt/<dataset>/` (default `~/.cache/adaptopt/<dataset>/`),
4. the system path `/usr/share/datasets/<dataset>/` (Debian's `dataset-fashion-mnist` installs there),

and, if none has them, downloaded into the cache from the official mirrors, each file checked against its
official MD5. A cached file that fails its checksum or does not parse is fetched again; a file anywhere
else is never modified, a corrupt one is reported with what to do.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import tempfile
import urllib.request
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "DATASETS",
    "DataError",
    "DatasetSpec",
    "LoadedDataset",
    "load_dataset",
    "read_idx",
    "resolve_default_dataset",
]

ROLES = ("train_images", "train_labels", "test_images", "test_labels")
FILE_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# IDX magic: two zero bytes, the element type (0x08 = unsigned byte) and the number of dimensions.
_UBYTE = 0x08
_EXPECTED_NDIM = {"train_images": 3, "train_labels": 1, "test_images": 3, "test_labels": 1}
_IMAGE_SIZE = (28, 28)
_GZIP_MAGIC = b"\x1f\x8b"

SYSTEM_DATA_DIRS: tuple[Path, ...] = (Path("/usr/share/datasets"),)
"""Where distribution packages put datasets; a module attribute so tests can point it elsewhere."""


class DataError(Exception):
    """A problem with the data that the user can fix; the CLI prints the message without a traceback."""


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset of the MNIST format: its name, mirrors and the official MD5 of each gzipped file."""

    name: str
    title: str
    mirrors: tuple[str, ...]
    md5: dict[str, str] = field(hash=False)
    debian_package: str | None = None


DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec(
        "mnist",
        "MNIST",
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
        ),
        md5={
            "train_images": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train_labels": "d53e105ee54ea40749a09fcbcd1e9432",
            "test_images": "9fb629c4189551a2d022fa330f9573f3",
            "test_labels": "ec29112dd5afa0611ce80d1b7f02629c",
        },
    ),
    "fashion-mnist": DatasetSpec(
        "fashion-mnist",
        "Fashion-MNIST",
        mirrors=(
            "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
            "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        ),
        md5={
            "train_images": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train_labels": "25c81989df183df01b3e8a0aad5dffbe",
            "test_images": "bef4ecab320f06d8554ea6380940ec79",
            "test_labels": "bb300cfdad3c16e7a12a480ee83cd310",
        },
        debian_package="dataset-fashion-mnist",
    ),
}

Fetcher = Callable[[str, Path], None]
"""Downloads a URL to a path, raising `OSError` on failure; injectable so tests never touch the network."""


# ---------------------------------------------------------------------------------------------------------
# IDX files


def read_idx(path: Path, *, expected_ndim: int | None = None) -> np.ndarray:
    """Read an IDX file of unsigned bytes, gzipped or raw (decided by its first bytes, not its name).

    Raises `DataError` naming the file if it is truncated, not gzip/IDX, or its header disagrees with its size.
    """
    try:
        raw = path.read_bytes()
        if raw[:2] == _GZIP_MAGIC:
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"{path}: cannot read the file ({error}); {_REPLACE_HINT}") from None
    if len(raw) < 4:
        raise DataError(f"{path}: truncated, {len(raw)} bytes is shorter than an IDX header; {_REPLACE_HINT}")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != _UBYTE or (expected_ndim is not None and ndim != expected_ndim):
        wanted = f"0x000008{expected_ndim:02x}" if expected_ndim is not None else "0x000008NN"
        raise DataError(
            f"{path}: not an IDX file of unsigned bytes (magic 0x{raw[:4].hex()}, expected {wanted}); {_REPLACE_HINT}"
        )
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise DataError(f"{path}: truncated inside the IDX header; {_REPLACE_HINT}")
    shape = struct.unpack(f">{ndim}I", raw[4:header_size])
    expected_size = header_size + int(np.prod(shape, dtype=np.int64))
    if len(raw) != expected_size:
        state = "truncated" if len(raw) < expected_size else "longer than its header says"
        raise DataError(
            f"{path}: {state} ({len(raw)} bytes, the header {list(shape)} needs {expected_size}); {_REPLACE_HINT}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(shape)


_REPLACE_HINT = "delete or replace it with the official file (see docs/experiments.md, 'Data')"


# ---------------------------------------------------------------------------------------------------------
# Finding and fetching


def cache_dir() -> Path:
    """The per-user cache root, `$XDG_CACHE_HOME/adaptopt` or `~/.cache/adaptopt`."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "adaptopt"


def _candidate_dirs(spec: DatasetSpec, data_dir: Path | None) -> list[Path]:
    candidates: list[Path] = []
    if data_dir is not None:
        candidates += [data_dir / spec.name, data_dir]
    environment_dir = os.environ.get("ADAPTOPT_DATA")
    if environment_dir:
        candidates.append(Path(environment_dir) / spec.name)
    candidates.append(cache_dir() / spec.name)
    candidates += [root / spec.name for root in SYSTEM_DATA_DIRS]
    return candidates


def _find_file(directory: Path, role: str) -> Path | None:
    for suffix in (".gz", ""):
        path = directory / (FILE_NAMES[role] + suffix)
        if path.is_file():
            return path
    return None


def _find_complete_dir(spec: DatasetSpec, data_dir: Path | None) -> tuple[Path, dict[str, Path]] | None:
    for directory in _candidate_dirs(spec, data_dir):
        found = {role: _find_file(directory, role) for role in ROLES}
        if all(path is not None for path in found.values()):
            return directory, {role: path for role, path in found.items() if path is not None}
    return None


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def urllib_fetcher(url: str, destination: Path) -> None:
    """Download `url` to `destination` with a progress bar; raises `OSError` (URLError is one) on failure."""
    from tqdm import tqdm

    with urllib.request.urlopen(url, timeout=30) as response:
        total = int(response.headers.get("Content-Length") or 0) or None
        with (
            destination.open("wb") as handle,
            tqdm(total=total, unit="B", unit_scale=True, desc=destination.name, leave=False) as bar,
        ):
            for block in iter(lambda: response.read(1 << 16), b""):
                handle.write(block)
                bar.update(len(block))


def _download(spec: DatasetSpec, target: Path, fetcher: Fetcher) -> None:
    """Fetch every missing or corrupt file of `spec` into `target`, checking each against its official MD5."""
    target.mkdir(parents=True, exist_ok=True)
    for role in ROLES:
        destination = target / (FILE_NAMES[role] + ".gz")
        if destination.is_file() and _md5(destination) == spec.md5[role]:
            continue
        failures: list[str] = []
        for mirror in spec.mirrors:
            url = mirror + destination.name
            with tempfile.NamedTemporaryFile(dir=target, suffix=".part", delete=False) as partial_file:
                partial = Path(partial_file.name)
            try:
                fetcher(url, partial)
                checksum = _md5(partial)
                if checksum != spec.md5[role]:
                    failures.append(f"{url}: MD5 {checksum}, expected {spec.md5[role]}")
                    continue
                partial.replace(destination)
                break
            except OSError as error:
                failures.append(f"{url}: {getattr(error, 'reason', error)}")
            finally:
                partial.unlink(missing_ok=True)
        else:
            raise _FetchFailed("; ".join(failures))


class _FetchFailed(Exception):
    pass


def _offline_message(spec: DatasetSpec, data_dir: Path | None, reason: str) -> str:
    searched = "\n".join(f"  {directory}" for directory in _candidate_dirs(spec, data_dir))
    lines = [
        f"No {spec.title} data found, and downloading it failed (offline?): {reason}",
        f"Looked for {', '.join(FILE_NAMES[role] + '[.gz]' for role in ROLES)} in:",
        searched,
        "To get the data, do one of:",
        f"  - download the four files from {spec.mirrors[0]} into {cache_dir() / spec.name}",
        "    (or any directory, then pass --data-dir DIR or set ADAPTOPT_DATA);",
    ]
    fashion = DATASETS["fashion-mnist"]
    lines.append(
        f"  - install Fashion-MNIST from the distribution: sudo apt-get install -y {fashion.debian_package}"
        + ("" if spec is fashion else ", then run with --dataset fashion-mnist")
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Loading


@dataclass
class LoadedDataset:
    """Images as float32 (N, 1, 28, 28) normalised by the training set's mean and std, labels as int64."""

    spec: DatasetSpec
    directory: Path
    files: dict[str, Path]
    file_sha256: dict[str, str]
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor

    @property
    def sha256(self) -> str:
        """One checksum for the dataset: the SHA-256 of the four files' SHA-256 in a fixed order."""
        return hashlib.sha256("".join(self.file_sha256[role] for role in ROLES).encode()).hexdigest()

    def describe(self) -> dict[str, Any]:
        """The dataset's entry in results.json."""
        return {
            "name": self.spec.name,
            "title": self.spec.title,
            "directory": str(self.directory),
            "files": {role: {"path": str(self.files[role]), "sha256": self.file_sha256[role]} for role in ROLES},
            "sha256": self.sha256,
            "train_size": len(self.train_labels),
            "test_size": len(self.test_labels),
        }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _parse(spec: DatasetSpec, directory: Path, files: dict[str, Path]) -> LoadedDataset:
    arrays = {role: read_idx(files[role], expected_ndim=_EXPECTED_NDIM[role]) for role in ROLES}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.shape[1:] != _IMAGE_SIZE:
            raise DataError(f"{files[f'{split}_images']}: images are {images.shape[1:]}, expected {_IMAGE_SIZE}")
        if len(images) != len(labels):
            raise DataError(
                f"{files[f'{split}_images']} has {len(images)} images but {files[f'{split}_labels']} has "
                f"{len(labels)} labels; {_REPLACE_HINT}"
            )
        if labels.size and labels.max() > 9:
            raise DataError(f"{files[f'{split}_labels']}: label {labels.max()} is not a digit 0-9; {_REPLACE_HINT}")
    train = torch.from_numpy(arrays["train_images"].astype(np.float32) / 255.0)
    mean, std = train.mean(), train.std()

    def normalise(images: np.ndarray) -> torch.Tensor:
        return ((torch.from_numpy(images.astype(np.float32) / 255.0) - mean) / std).unsqueeze(1)

    return LoadedDataset(
        spec=spec,
        directory=directory,
        files=files,
        file_sha256={role: _sha256(files[role]) for role in ROLES},
        train_images=normalise(arrays["train_images"]),
        train_labels=torch.from_numpy(arrays["train_labels"].astype(np.int64)),
        test_images=normalise(arrays["test_images"]),
        test_labels=torch.from_numpy(arrays["test_labels"].astype(np.int64)),
    )


def _is_cache(directory: Path) -> bool:
    return directory.parent == cache_dir()


def load_dataset(name: str, data_dir: Path | None = None, *, fetcher: Fetcher = urllib_fetcher) -> LoadedDataset:
    """Find `name` locally (see the module docstring), else download it into the cache, and load it."""
    spec = DATASETS[name]
    found = _find_complete_dir(spec, data_dir)
    if found is not None:
        directory, files = found
        try:
            return _parse(spec, directory, files)
        except DataError:
            if not _is_cache(directory):
                raise
            # A corrupt or truncated earlier download: fetch it again below rather than fail.
    target = cache_dir() / spec.name
    try:
        _download(spec, target, fetcher)
    except _FetchFailed as failure:
        raise DataError(_offline_message(spec, data_dir, str(failure))) from None
    files = {role: target / (FILE_NAMES[role] + ".gz") for role in ROLES}
    return _parse(spec, target, files)


def resolve_default_dataset(data_dir: Path | None, *, fetcher: Fetcher = urllib_fetcher) -> tuple[str, str]:
    """MNIST if it is present or downloadable, else Fashion-MNIST; returns (name, why) for the user."""
    if _find_complete_dir(DATASETS["mnist"], data_dir) is not None:
        return "mnist", "MNIST found locally"
    try:
        _download(DATASETS["mnist"], cache_dir() / "mnist", fetcher)
    except _FetchFailed as failure:
        return "fashion-mnist", f"MNIST is not available here and could not be downloaded ({failure})"
    return "mnist", "MNIST downloaded"
