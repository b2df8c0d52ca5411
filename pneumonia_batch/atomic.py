"""Atomic file writes: a crash or a full disk never leaves half a file behind."""

from __future__ import annotations

import errno
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Callable


def write_atomic(path: Path, content: str | bytes, follow_link: bool = True) -> None:
    """Write ``content`` to ``path`` atomically (see ``save_atomic``)."""
    binary = isinstance(content, bytes)
    text_mode = {} if binary else {"newline": "", "encoding": "utf-8"}  # not the locale's: cron's may be ASCII

    def write(tmp: Path) -> None:
        with open(tmp, "wb" if binary else "w", **text_mode) as handle:
            handle.write(content)

    save_atomic(path, write, follow_link=follow_link)


def save_atomic(path: Path, save: Callable[[Path], None], suffix: str = ".tmp",
                follow_link: bool = True) -> None:
    """Have ``save`` write a temp file in the same folder, fsync it, then rename it over ``path`` and
    fsync the folder.  The temp file's name ends in ``suffix``, for writers that pick the format
    from it (Keras: ``.keras`` or ``.h5``).

    A symlink is followed, as a shell's ``>`` would: its target is replaced, the link stays.  With
    ``follow_link=False`` the link itself is replaced: in a folder others can write in, a link
    placed there must not send the write elsewhere.
    """
    path = Path(os.path.realpath(path) if follow_link else os.path.abspath(path))
    tmp = None
    try:
        # the name cut short: a name near the file system's limit would leave no room for the temp's
        prefix = path.name  # cut to 64 bytes, whole characters: the limit is 255 bytes, not characters
        while len(os.fsencode(prefix)) > 64:
            prefix = prefix[:-1]
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{prefix}.", suffix=suffix)
        os.close(fd)
        try:
            replaced = os.stat(path, follow_symlinks=follow_link)
        except FileNotFoundError:
            replaced = None
        if replaced and (kind := special_kind(replaced)):  # replacing /dev/null, as root, would delete it
            raise OSError(errno.EINVAL, f"it is a {kind}, not a file this tool can replace")
        kept = replaced if replaced and not stat.S_ISLNK(replaced.st_mode) else None
        if kept:
            mode = stat.S_IMODE(kept.st_mode)  # a report an admin made private stays private
        else:  # a new file, or one in place of a link
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask  # mkstemp's 0600 would surprise whoever reads the report
        save(Path(tmp))
        os.chmod(tmp, mode)  # after the save: a writer may have made the file anew
        if kept:
            _keep_owner(tmp, kept)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, CannotWrite):
            raise CannotWrite(path, exc) from exc
        raise
    try:  # the rename itself, before anything done later (a deletion) reaches the disk
        fsync_path(path.parent)
    except OSError as error:  # a file system that cannot fsync a folder; the file is in place all the same
        if error.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EACCES):
            raise


SPECIAL_KINDS = {stat.S_IFCHR: "character device", stat.S_IFBLK: "block device", stat.S_IFIFO: "FIFO",
                 stat.S_IFSOCK: "socket", stat.S_IFDIR: "folder"}


def special_kind(status: os.stat_result) -> str:
    """What a file that is neither a regular file nor a link is ("character device"), or ""."""
    return SPECIAL_KINDS.get(stat.S_IFMT(status.st_mode), "")


class CannotWrite(OSError):
    """An OSError naming the file it was writing (``what`` it is, if given): a full disk says only
    "No space left on device"."""

    def __init__(self, path: Path, cause: OSError, what: str = ""):
        super().__init__(cause.errno, cause.strerror or str(cause), str(path))
        self.what = what

    def __str__(self) -> str:
        return f"cannot write {self.what + ' ' if self.what else ''}{self.filename}: {self.strerror}"


def _keep_owner(tmp: str, replaced: os.stat_result) -> None:
    """The replaced file's owner and group, so the group that read the report still can.  Only
    root may give a file away; anyone else may still give it a group they are in.  A file system
    without owners (a share) refuses both, and the file is theirs as a shell's ``>`` would leave it."""
    made = os.stat(tmp)
    if (made.st_uid, made.st_gid) == (replaced.st_uid, replaced.st_gid):
        return
    for uid in (replaced.st_uid, -1):
        try:
            os.chown(tmp, uid, replaced.st_gid)
            return
        except OSError:
            continue


def fsync_path(path: Path) -> None:
    """Flush a file (one another library wrote) or a folder's entries to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, payload, follow_link: bool = True) -> None:
    write_atomic(path, json.dumps(payload, indent=2) + "\n", follow_link=follow_link)


def same_file(a: Path, b: Path) -> bool:
    """One file, however named: through links, hard links, or in another letter case on a share that
    ignores it.  Where one of them is not there (an output not written yet, a source gone since the
    scan), their resolved names are compared."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def cannot_write_in(folder: Path) -> str:
    """Why a file cannot be made in ``folder``, or "" when it can.  Found by trying, as the
    atomic write or SQLite will: mode bits say nothing of a read-only mount."""
    if not folder.is_dir():
        return f"{folder} " + ("is not a folder" if folder.exists() else "does not exist")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        return f"cannot write in {folder}: {exc.strerror}"
    return ""
