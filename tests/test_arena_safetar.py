"""Safe extraction of submission archives: each refusal, and a good starter-kit archive."""

from __future__ import annotations

import io
import os
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from mergearena.arena.safetar import extract_archive
from mergearena.errors import SubmissionError

STARTER_KIT = {
    "submission/merge.py": b"print('merging')\n",
    "submission/README.md": b"# my merge\n",
    "submission/configs/recipe.yaml": b"merge_method: linear\n",
}


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], mode: str = "w:gz"):
    with tarfile.open(path, mode) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _member(name: str, kind: bytes = tarfile.REGTYPE, **fields: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    for key, value in fields.items():
        setattr(info, key, value)
    return info


def _assert_refused(archive: Path, dest: Path, match: str, **limits: int) -> None:
    with pytest.raises(SubmissionError, match=match):
        extract_archive(archive, dest, **limits)
    assert not dest.exists()
    assert [p.name for p in dest.parent.iterdir() if p.name.startswith(".")] == []


def test_starter_kit_extracts_with_safe_modes(tmp_path: Path) -> None:
    members: list[tuple[tarfile.TarInfo, bytes | None]] = [
        (_member("./", tarfile.DIRTYPE, mode=0o777), None),
        (_member("./submission", tarfile.DIRTYPE, mode=0o700), None),
    ]
    for name, data in STARTER_KIT.items():  # setuid and exec bits in the archive are dropped
        members.append((_member(f"./{name}", mode=0o4755), data))
    archive = _tar(tmp_path / "kit.tgz", members)
    dest = tmp_path / "out"

    files = extract_archive(archive, dest)

    assert files == [dest / name for name in STARTER_KIT]
    for name, data in STARTER_KIT.items():
        assert (dest / name).read_bytes() == data
        assert stat.S_IMODE((dest / name).stat().st_mode) == 0o644
    assert stat.S_IMODE((dest / "submission").stat().st_mode) == 0o755
    assert stat.S_IMODE((dest / "submission/configs").stat().st_mode) == 0o755
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kit.tgz", "out"]  # no leftovers


def test_plain_tar_and_zip_extract(tmp_path: Path) -> None:
    plain = _tar(tmp_path / "kit.tar", [(_member(n), d) for n, d in STARTER_KIT.items()], "w")
    with zipfile.ZipFile(tmp_path / "kit.zip", "w", zipfile.ZIP_DEFLATED) as zipped:
        for name, data in STARTER_KIT.items():
            zipped.writestr(name, data)
    for archive in (plain, tmp_path / "kit.zip"):
        dest = tmp_path / f"out-{archive.suffix}"
        files = extract_archive(archive, dest)
        assert {f.relative_to(dest).as_posix(): f.read_bytes() for f in files} == STARTER_KIT


def test_refuses_an_existing_destination(tmp_path: Path) -> None:
    archive = _tar(tmp_path / "kit.tgz", [(_member("a.txt"), b"a")])
    (tmp_path / "out").mkdir()
    with pytest.raises(SubmissionError, match="already exists"):
        extract_archive(archive, tmp_path / "out")


def test_refuses_an_absolute_path(tmp_path: Path) -> None:
    archive = _tar(tmp_path / "evil.tgz", [(_member("ok.txt"), b"fine"), (_member("/etc/x"), b"x")])
    _assert_refused(archive, tmp_path / "out", "'/etc/x' has an absolute path")


def test_refuses_a_dotdot_component(tmp_path: Path) -> None:
    archive = _tar(tmp_path / "evil.tgz", [(_member("a/../../escape.txt"), b"x")])
    _assert_refused(archive, tmp_path / "out", r"'a/../../escape.txt' has a '\.\.' component")
    assert not (tmp_path / "escape.txt").exists()


def test_refuses_a_symlink_out(tmp_path: Path) -> None:
    link = _member("model", tarfile.SYMTYPE, linkname="/etc")
    through = _member("model/passwd")  # would write through the link if it were created
    archive = _tar(tmp_path / "evil.tgz", [(link, None), (through, b"x")])
    _assert_refused(archive, tmp_path / "out", "'model' is a symbolic link to '/etc'")


def test_refuses_a_symlink_even_inside(tmp_path: Path) -> None:
    """No link is accepted, not even one that stays inside: none is needed, and a link left in
    the submission could be redirected by a later step."""
    archive = _tar(
        tmp_path / "links.tgz",
        [(_member("a.txt"), b"a"), (_member("b.txt", tarfile.SYMTYPE, linkname="a.txt"), None)],
    )
    _assert_refused(archive, tmp_path / "out", "'b.txt' is a symbolic link")


def test_refuses_a_hardlink_out(tmp_path: Path) -> None:
    link = _member("shadow", tarfile.LNKTYPE, linkname="../../etc/shadow")
    archive = _tar(tmp_path / "evil.tgz", [(link, None)])
    _assert_refused(archive, tmp_path / "out", "'shadow' is a hard link")


def test_refuses_a_device_file(tmp_path: Path) -> None:
    device = _member("dev/sda", tarfile.CHRTYPE, devmajor=8, devminor=0)
    archive = _tar(tmp_path / "evil.tgz", [(device, None)])
    _assert_refused(archive, tmp_path / "out", "'dev/sda' is a device file")


def test_refuses_a_fifo(tmp_path: Path) -> None:
    archive = _tar(tmp_path / "evil.tgz", [(_member("pipe", tarfile.FIFOTYPE), None)])
    _assert_refused(archive, tmp_path / "out", "'pipe' is a device file, FIFO")


def test_refuses_a_name_used_twice(tmp_path: Path) -> None:
    archive = _tar(tmp_path / "twice.tgz", [(_member("a.txt"), b"one"), (_member("a.txt"), b"2")])
    _assert_refused(archive, tmp_path / "out", "'a.txt' appears twice")


def test_refuses_too_many_files(tmp_path: Path) -> None:
    archive = _tar(tmp_path / "many.tgz", [(_member(f"f{i}.txt"), b"x") for i in range(11)])
    _assert_refused(archive, tmp_path / "out", "more than 10 members", max_files=10)


def test_refuses_a_gzip_bomb_by_bytes_written(tmp_path: Path) -> None:
    zeros = _member("zeros.bin")
    archive = _tar(tmp_path / "bomb.tgz", [(zeros, bytes(5 * 2**20))])
    assert archive.stat().st_size < 64 * 1024  # it really is a bomb: tiny compressed
    _assert_refused(archive, tmp_path / "out", "past the limit of 1048576 bytes", max_bytes=2**20)


def test_refuses_a_sparse_bomb(tmp_path: Path) -> None:
    """A sparse member stores 1 byte but expands to 3 MiB of zeros: counted as it expands."""
    sparse_map = {"GNU.sparse.major": "0", "GNU.sparse.minor": "1", "GNU.sparse.name": "s.bin"}
    sparse_map |= {"GNU.sparse.map": f"{3 * 2**20},1", "GNU.sparse.realsize": str(3 * 2**20 + 1)}
    archive = _tar(tmp_path / "sparse.tar", [(_member("s.bin", pax_headers=sparse_map), b"x")], "w")
    assert archive.stat().st_size < 16 * 1024
    _assert_refused(archive, tmp_path / "out", "'s.bin' takes the archive past", max_bytes=2**20)


def test_refuses_a_huge_pax_header(tmp_path: Path) -> None:
    """A header is read whole into memory, so the decompressed stream itself is capped: a 5 MiB
    pax header that gzips to a few kB stops at the limit."""
    info = _member("a.txt", pax_headers={"comment": "x" * 5 * 2**20})
    archive = _tar(tmp_path / "pax.tgz", [(info, b"a")], "w:gz")
    assert archive.stat().st_size < 64 * 1024
    _assert_refused(
        archive, tmp_path / "out", "decompresses to more than", max_bytes=2**20, max_files=2
    )


def test_refuses_a_file_over_the_member_limit(tmp_path: Path) -> None:
    archive = _tar(tmp_path / "big.tgz", [(_member("small"), b"x"), (_member("big"), bytes(2000))])
    _assert_refused(archive, tmp_path / "out", "'big' is larger than", max_member_bytes=1000)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_refuses_a_corrupt_archive(tmp_path: Path, damage: str) -> None:
    good = _tar(tmp_path / "kit.tgz", [(_member(n), os.urandom(50_000)) for n in STARTER_KIT])
    archive = tmp_path / "bad.tgz"
    if damage == "truncated":
        archive.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    else:
        archive.write_bytes(os.urandom(10_000))
    _assert_refused(archive, tmp_path / "out", "not a readable .tar, .tar.gz or .zip")


def test_refuses_a_tar_whose_middle_header_is_damaged(tmp_path: Path) -> None:
    """tarfile stops quietly at a bad header; the data left after it gives the damage away."""
    plain = _tar(tmp_path / "kit.tar", [(_member(f"f{i}"), bytes(20_000)) for i in range(3)], "w")
    raw = bytearray(plain.read_bytes())
    second_header = 512 + 20_480
    raw[second_header : second_header + 100] = b"\xff" * 100
    (tmp_path / "bad.tar").write_bytes(raw)
    _assert_refused(tmp_path / "bad.tar", tmp_path / "out", "after the end-of-archive marker")


def test_refuses_a_zip_symlink(tmp_path: Path) -> None:
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        link = zipfile.ZipInfo("model")
        link.create_system = 3
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zipped.writestr(link, "/etc")
    _assert_refused(archive, tmp_path / "out", "'model' is a symbolic link")


def test_refuses_a_zip_dotdot_path(tmp_path: Path) -> None:
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("../escape.txt", b"x")
    _assert_refused(archive, tmp_path / "out", "'../escape.txt' has a '..' component")
