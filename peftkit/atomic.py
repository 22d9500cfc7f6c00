"""Writes that a kill at any instant cannot leave half done: one file, or a folder of files that belong together.

One file is written to a temporary sibling, fsynced and renamed over its target. A set of files that a reader takes
together (a HF PEFT checkpoint: ``adapter_config.json`` beside ``adapter_model.safetensors``) cannot be replaced
by renaming its files one after the other, since a kill between the renames leaves a folder whose files disagree.
Such a set is built in a complete new folder beside the old one, which keeps the old folder's other entries as hard
links, and the two folders are exchanged in one step (Linux's ``renameat2(RENAME_EXCHANGE)``). Where the system has
no atomic exchange, the files are renamed one by one in the order given and :data:`FOLDERS_SWAP_ATOMICALLY` is
False, so the guarantee is stated only where it holds.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

from peftkit.errors import CheckpointError

Writer = Callable[[str], object]  # writes the file's content to the temporary path it is given

_RENAME_EXCHANGE = 2  # from linux/fs.h
_AT_FDCWD = -100


def _load_renameat2() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        function = libc.renameat2
    except (OSError, AttributeError):  # glibc older than 2.28, or a libc without it
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_renameat2 = _load_renameat2()
FOLDERS_SWAP_ATOMICALLY = _renameat2 is not None


def _fsync(path: str | Path, *, folder: bool = False) -> None:
    descriptor = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if folder else 0))
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _remove_stale(parent: Path, prefix: str) -> None:
    """Remove what a killed earlier write left behind: temporaries are named ``PREFIX...`` and nothing else is."""
    for stale in parent.glob(f"{prefix}*"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def write_file_atomically(path: Path, write: Writer) -> None:
    """Write through a temporary file in the same folder, fsync it, then rename it over ``path``."""
    _remove_stale(path.parent, f".{path.name}.")
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(handle)
    try:
        write(temporary)
        _fsync(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths in one step; False where this filesystem cannot (the caller falls back)."""
    assert _renameat2 is not None
    result = _renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(first))


def _default_folder_mode() -> int:
    """What ``mkdir`` would give a new folder (0o777 less the umask); ``mkdtemp`` gives 0o700."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask


def _link_or_copy(source: str, destination: str) -> None:
    try:
        os.link(source, destination, follow_symlinks=False)
    except OSError:
        shutil.copy2(source, destination, follow_symlinks=False)


def _keep_other_entries(old: Path, new: Path, written: Mapping[str, Writer]) -> None:
    """Carry the old folder's entries that this write does not replace into the new one, as hard links."""
    for entry in old.iterdir():
        if entry.name in written:
            continue
        target = new / entry.name
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, target, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(str(entry), str(target))


def write_files_together(directory: Path, files: Mapping[str, Writer]) -> None:
    """Replace ``files`` (name → writer) in ``directory`` so that a reader sees all the old ones or all the new ones.

    The folder's other entries are kept. Where folders cannot be exchanged atomically (see
    :data:`FOLDERS_SWAP_ATOMICALLY`) the files are renamed into place one by one, in the order given."""
    if directory.is_symlink():
        directory = directory.resolve()
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"cannot write to {str(directory)!r}: it is a file, not a folder")
    directory.parent.mkdir(parents=True, exist_ok=True)
    if _renameat2 is None:
        directory.mkdir(exist_ok=True)
        for name, write in files.items():
            write_file_atomically(directory / name, write)
        return
    prefix = f".{directory.name}.peftkit-"
    _remove_stale(directory.parent, prefix)
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=prefix))
    try:
        os.chmod(staging, directory.stat().st_mode & 0o7777 if directory.exists() else _default_folder_mode())
        if directory.exists():
            _keep_other_entries(directory, staging, files)
        for name, write in files.items():
            write(str(staging / name))
            _fsync(staging / name)
        _fsync(staging, folder=True)
        if not directory.exists():
            os.rename(staging, directory)
        elif not _exchange(staging, directory):
            for name in files:  # this filesystem cannot exchange folders: one file at a time, in order
                os.replace(staging / name, directory / name)
        _fsync(directory.parent, folder=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # after an exchange it holds the old folder
