"""File helpers shared by model loading, export, publishing and the jobs (no heavy imports here).

Atomic writes. `atomic_write(path)` yields an open file, `atomic_path(path)` a temporary path for libraries
that write to a path themselves (torch.onnx.export, onnx.save, a downloaded directory tree). Either way the
new content is written beside the target (or in `tmp_dir`, which must be on the same filesystem), fsynced,
and renamed over the target only when the block ends without an exception: a reader sees the old file or
the new one, never part of one, and a failed write leaves the old file as it was and no temporary behind.

Durability (the default; `fsync=False` or `sync_dir=False` opt out where a caller has a cheaper way to
recover): the new file, or every file and directory of a new tree, is fsynced before the rename, because
otherwise a crash can leave the new name pointing at empty or partial data (delayed allocation on ext4,
XFS); the target's directory is fsynced after the rename, so that the new name itself survives a crash. The
directory fsync costs little next to the data's, so it is on by default even where the code this replaced
skipped it.
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

PathLike = str | os.PathLike[str]


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (weights files are hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_dir(path: PathLike) -> None:
    """fsync a directory, so that the entries created, renamed or removed in it survive a crash."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        # Some network and FUSE filesystems cannot fsync a directory; there is nothing more to do there.
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)


def fsync_tree(path: PathLike) -> None:
    """fsync a file, or every file and directory of a tree (each directory after its contents).

    Symbolic links are not followed: what they point to is not part of the tree."""
    path = Path(path)
    if not path.is_dir() or path.is_symlink():
        _fsync_file(path)
        return
    for root, _dirs, names in os.walk(path, topdown=False):
        for name in names:
            file = os.path.join(root, name)
            if not os.path.islink(file):
                _fsync_file(file)
        fsync_dir(root)


def _fsync_file(path: PathLike) -> None:
    # fsync flushes the file's data whatever mode the descriptor was opened in.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace(src: PathLike, dst: PathLike, *, sync_dir: bool = True) -> None:
    """Move `src` (a finished file or tree, on `dst`'s filesystem) to `dst`, replacing what is there.

    A file, or a tree where there is nothing or an empty directory, moves in with one rename(2), which is
    atomic. A tree replacing a non-empty directory cannot be one rename (rename(2) refuses, and Python has no
    renameat2's RENAME_EXCHANGE): the old tree is first renamed aside into a directory beside `src`, so
    `dst` is missing for the instant between the two renames but never partial, and then deleted."""
    src, dst = Path(src), Path(dst)
    try:
        os.replace(src, dst)
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not src.is_dir():
            raise
        aside = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".old", dir=src.parent))
        try:
            os.rename(dst, aside / dst.name)
            try:
                os.rename(src, dst)
            except BaseException:
                os.rename(aside / dst.name, dst)  # put the old tree back rather than leave nothing
                raise
            if sync_dir:
                fsync_dir(dst.parent)
        finally:
            shutil.rmtree(aside, ignore_errors=True)
        return
    if sync_dir:
        fsync_dir(dst.parent)


@contextmanager
def atomic_write(
    path: PathLike,
    mode: str = "wb",
    *,
    encoding: str = "utf-8",
    tmp_dir: PathLike | None = None,
    fsync: bool = True,
    sync_dir: bool = True,
) -> Iterator[IO[Any]]:
    """An open file ("wb" or "w") whose content replaces `path` when the block ends without an exception.

    The temporary file is `.<name>.<random>.tmp` in `tmp_dir` (default: `path`'s directory; it must exist
    and be on `path`'s filesystem). It is created with the permissions open() would give a new file (0666
    less the umask), not mkstemp's 0600, so other users (a Triton server) can read the result."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write writes a whole file: mode must be 'wb' or 'w', not {mode!r}")
    path = Path(path)
    tmp = Path(tmp_dir if tmp_dir is not None else path.parent) / f".{path.name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        try:
            fh = open(fd, mode, encoding=None if "b" in mode else encoding)
        except BaseException:
            os.close(fd)
            raise
        with fh:
            yield fh
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        replace(tmp, path, sync_dir=fsync and sync_dir)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_path(
    path: PathLike,
    *,
    tmp_dir: PathLike | None = None,
    fsync: bool = True,
    sync_dir: bool = True,
) -> Iterator[Path]:
    """A temporary path (nothing there yet) whose file or directory tree replaces `path` when the block ends
    without an exception; the block must have created something there.

    The path is `<private directory>/<path's name>`, so libraries that read meaning into a suffix see the
    target's; the private directory (`.<name>.<random>.tmp` in `tmp_dir`, default `path`'s directory, which
    must exist and be on `path`'s filesystem) is removed in every case. A directory tree replaces an existing
    one as `replace` describes."""
    path = Path(path)
    parent = tmp_dir if tmp_dir is not None else path.parent
    work = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent))
    staged = work / path.name
    try:
        yield staged
        if not os.path.lexists(staged):
            raise FileNotFoundError(errno.ENOENT, f"nothing was written in place of {path}", str(staged))
        if fsync:
            fsync_tree(staged)
        replace(staged, path, sync_dir=fsync and sync_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
