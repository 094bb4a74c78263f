"""Atomic writes that never delete what a user owns: build the output beside its destination,
then move it in with a rename that cannot replace anything it did not check.

- An existing destination is replaced only with `overwrite`, and only when it is of the kind the
  writer declares (`Replaceable`, e.g. "a diffusers checkpoint folder"); anything else is refused,
  overwrite or not. The default (callers that name no kind): a file, or an empty folder.
- A destination that is, contains or lies inside a `protect`ed path (a conversion's source) is
  refused.
- A new destination goes in with a rename that fails if something appeared meanwhile (`os.link`
  for files, `renameat2(RENAME_NOREPLACE)` for folders; where neither exists: a final existence
  check, then `os.rename`, a narrow window). A file is overwritten with one `os.replace`; a folder
  is swapped with `renameat2(RENAME_EXCHANGE)` (elsewhere: the old one is moved aside, the new one
  moved in, the old one deleted; it is moved back if the move in fails). So a destination never
  disappears, except for that brief aside step on systems without renameat2.
- Temporaries are `.NAME.tmp-HOST-PID-RANDOM` (and `.NAME.old-...`); those of writers on this host
  that are no longer running are removed on the next write to the same destination (an `.old-`
  one only while the destination exists: otherwise it may be the only copy left).
"""

import contextlib
import ctypes
import errno
import functools
import hashlib
import os
import re
import shutil
import socket
import sys
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path


class DestinationExistsError(FileExistsError):
    """The destination exists and overwriting was not asked for (or may not replace it)."""


class DestinationNotReplaceableError(DestinationExistsError):
    """The destination holds something other than what overwrite may replace."""


class DestinationOverlapsSourceError(ValueError):
    """The destination is, contains or lies inside a protected path (the data being converted)."""


@dataclass(frozen=True)
class Replaceable:
    """What `overwrite` may replace: `matches(path)` decides, `description` names it in errors."""

    description: str
    matches: Callable[[Path], bool]


def _file_or_empty_folder(path: Path) -> bool:
    if path.is_dir():
        return not path.is_symlink() and not any(path.iterdir())
    return path.is_file()


FILE_OR_EMPTY_FOLDER = Replaceable("a file, or an empty folder", _file_or_empty_folder)


def folder_kind(description: str, is_one: Callable[[Path], bool]) -> Replaceable:
    """Folders that `is_one` recognises (e.g. a checkpoint of the format being written), and
    empty folders (nothing to lose)."""
    return Replaceable(
        f"{description}, or an empty folder",
        lambda path: path.is_dir() and (is_one(path) or not any(path.iterdir())),
    )


@contextlib.contextmanager
def atomic_output(
    destination: str | os.PathLike,
    *,
    overwrite: bool = False,
    replaceable: Replaceable = FILE_OR_EMPTY_FOLDER,
    protect: Iterable[str | os.PathLike | None] = (),
) -> Iterator[Path]:
    """Yield a temporary path (not yet created) to write a file or folder into; on success it is
    moved to `destination` (rules in the module docstring), on failure removed.

    `protect`: paths the destination must not be, contain or lie inside (those that exist are
    compared after resolving links)."""
    destination = Path(destination)
    protected = _existing(protect)
    check_destination(destination, overwrite=overwrite, replaceable=replaceable, protect=protected)
    destination.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(destination)
    temporary = _temporary(destination, "tmp")
    try:
        yield temporary
        if not os.path.lexists(temporary):
            raise RuntimeError(f"nothing was written for {destination}")
        _check_apart(destination, protected)  # links may have changed while writing
        _commit(temporary, destination, overwrite=overwrite, replaceable=replaceable)
    except BaseException:
        _remove(temporary)
        raise


def check_destination(
    destination: str | os.PathLike,
    *,
    overwrite: bool = False,
    replaceable: Replaceable = FILE_OR_EMPTY_FOLDER,
    protect: Iterable[str | os.PathLike | None] = (),
) -> None:
    """Raise the error `atomic_output` would raise for `destination` before writing, so a
    command can refuse a bad destination before any work (the write checks again)."""
    destination = Path(destination)
    _check_apart(destination, _existing(protect))
    _check_existing(destination, overwrite=overwrite, replaceable=replaceable)


def _existing(paths: Iterable[str | os.PathLike | None]) -> list[Path]:
    return [Path(p) for p in paths if p is not None and os.path.lexists(p)]


def _check_apart(destination: Path, protected: list[Path]) -> None:
    target = destination.resolve()
    for source in protected:
        resolved = source.resolve()
        if target == resolved:
            relation = "is"
        elif target.is_relative_to(resolved):
            relation = "lies inside"
        elif resolved.is_relative_to(target):
            relation = "contains"
        else:
            continue
        raise DestinationOverlapsSourceError(
            f"destination {destination} {relation} {source}, which this write reads from; "
            "choose a destination outside it (it may neither be nor contain the source)"
        )


def _check_existing(
    destination: Path, *, overwrite: bool, replaceable: Replaceable, output_is_folder=None
) -> None:
    """Raise unless `destination` is absent, or `overwrite` and it is of the replaceable kind
    (and, once the output exists, of the same type: a file for a file, a folder for a folder)."""
    if not os.path.lexists(destination):
        return
    fits = replaceable.matches(destination) and (
        output_is_folder is None or output_is_folder == destination.is_dir()
    )
    what = _describe(destination)
    if not fits:
        raise DestinationNotReplaceableError(
            f"destination {destination} already exists and is {what}; overwrite replaces only "
            f"{replaceable.description}, so it is kept: choose a new path (or remove it yourself)"
        )
    if not overwrite:
        raise DestinationExistsError(
            f"destination {destination} already exists ({what}); choose a new path, or overwrite "
            "it explicitly (overwrite=True; --overwrite on the command line)"
        )


def _describe(path: Path) -> str:
    if path.is_symlink():
        return f"a link to {os.readlink(path)}"
    if path.is_dir():
        names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
        if not names:
            return "an empty folder"
        more = f" and {len(names) - 4} more" if len(names) > 4 else ""
        return f"a folder holding {', '.join(names[:4])}{more}"
    return "a file" if path.is_file() else "a special file"


def _commit(temporary: Path, destination: Path, *, overwrite: bool, replaceable) -> None:
    is_folder = temporary.is_dir()
    if _move_noreplace(temporary, destination, is_folder):
        return
    _check_existing(  # something is there (now): it must still be replaceable
        destination, overwrite=overwrite, replaceable=replaceable, output_is_folder=is_folder
    )
    if is_folder:
        _swap_folder(temporary, destination)
    else:
        os.replace(temporary, destination)  # one step: the destination never disappears


def _move_noreplace(source: Path, target: Path, is_folder: bool) -> bool:
    """Move `source` to `target` unless something is at `target` (then False); never replaces."""
    if not is_folder:
        try:
            os.link(source, target)
        except FileExistsError:
            return False
        except OSError as error:  # no hard links on this file system: try a rename instead
            if error.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK):
                raise
        else:
            os.unlink(source)
            return True
    try:
        if _renameat2(source, target, _RENAME_NOREPLACE):
            return True
    except FileExistsError:
        return False
    if os.path.lexists(target):
        return False
    os.rename(source, target)  # no renameat2 here: the window since the check above is open
    return True


def _swap_folder(new: Path, destination: Path) -> None:
    """Put the folder `new` at `destination` in place of the folder there, then delete that."""
    if _renameat2(new, destination, _RENAME_EXCHANGE):
        _remove(new)  # now the old folder
        return
    old = _temporary(destination, "old")
    os.rename(destination, old)
    try:
        if not _move_noreplace(new, destination, True):
            raise DestinationExistsError(
                f"destination {destination} was created by someone else while it was replaced"
            )
    except BaseException as error:
        if _move_noreplace(old, destination, True):  # the old one is back
            raise
        kept = destination.with_name(f"{destination.name}.previous-{uuid.uuid4().hex[:8]}")
        os.rename(old, kept)  # a visible name: never taken for a stale temporary
        raise DestinationExistsError(
            f"replacing {destination} failed ({error}) and something else is there now; the "
            f"previous {destination.name} is kept at {kept}"
        ) from error
    _remove(old)


_RENAME_NOREPLACE, _RENAME_EXCHANGE, _AT_FDCWD = 1, 2, -100


@functools.cache
def _libc_renameat2():
    if not sys.platform.startswith("linux"):
        return None
    function = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if function is not None:
        function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]
        function.argtypes += [ctypes.c_uint]
        function.restype = ctypes.c_int
    return function


def _renameat2(source: Path, target: Path, flags: int) -> bool:
    """renameat2(2) with `flags`; False where this system or file system lacks it."""
    function = _libc_renameat2()
    if function is None:
        return False
    if function(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(target))  # EEXIST -> FileExistsError


_HOST = hashlib.blake2s(socket.gethostname().encode(), digest_size=3).hexdigest()


def _temporary(destination: Path, role: str) -> Path:
    name = f".{destination.name}.{role}-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    return destination.parent / name


def _remove_stale_temporaries(destination: Path) -> None:
    """Remove the temporaries of earlier writes to `destination` by processes (of this host)
    that no longer run: a killed write leaves a full-size hidden file behind."""
    pattern = re.compile(
        rf"\.{re.escape(destination.name)}\.(tmp|old)-{_HOST}-([0-9]+)-[0-9a-f]{{8}}"
    )
    with contextlib.suppress(OSError):
        for entry in destination.parent.iterdir():
            match = pattern.fullmatch(entry.name)
            if match is None or _running(int(match.group(2))):
                continue
            if match.group(1) == "old" and not os.path.lexists(destination):
                continue  # a replace killed half way: this may be the only copy
            _remove(entry)


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        path.unlink()
