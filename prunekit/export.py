"""Output folders: checked before any work, written to a temporary sibling folder, then renamed into place.

Nothing is ever left half-written: on any error or signal the temporary folder is removed and an existing
output folder is left untouched. Files and folders get the permissions the user's umask gives new files
(``tempfile`` would leave them 0700/0600). Scratch space (plots before they are copied) lives in
:func:`scratch`, removed on any exit.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from prunekit.errors import PrunekitError


WRITTEN: list[Path] = []  # output folders this process has put in place (for what a stopped command reports)


def check_output_dir(output_dir: str | Path, overwrite: bool, source: str | None = None) -> Path:
    """Refuse an existing folder unless ``overwrite``, the source model's folder, and a location that cannot be
    written — before any heavy work."""
    out = Path(output_dir).expanduser().resolve()
    if source is not None and Path(source).expanduser().exists():
        src = Path(source).expanduser().resolve()
        if src == out or out in src.parents or src in out.parents:
            raise PrunekitError(f"output folder {out} is, contains or lies inside the source model's folder {src}; "
                                "the source is never written to: choose another --output_dir")
    if out.exists() and not out.is_dir():
        raise PrunekitError(f"output path {out} exists and is not a folder")
    if out.exists() and not overwrite:
        raise PrunekitError(f"output folder {out} already exists; choose another --output_dir or pass --overwrite true")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise PrunekitError(f"cannot create output folder {out}: {parent} is not a folder")
    try:  # a real probe: permissions, read-only mounts and pseudo file systems all show here (root included)
        shutil.rmtree(tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=parent))
    except OSError as e:
        raise PrunekitError(f"cannot write output folder {out}: {parent} is not writable ({e.strerror}); choose "
                            "another --output_dir") from None
    return out


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _apply_umask(folder: Path) -> None:
    mask = _umask()
    for root, dirs, files in os.walk(folder):
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
    os.chmod(folder, 0o777 & ~mask)


def write_atomically(output_dir: str | Path, overwrite: bool, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a fresh temporary folder beside ``output_dir``, then move it into place.

    On any error (or signal) the temporary folder is removed and an existing ``output_dir`` is left untouched.
    """
    out = check_output_dir(output_dir, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    trash = None
    try:
        write(tmp)
        _apply_umask(tmp)
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            out.rename(trash / out.name)
            tmp.rename(out)
        else:
            tmp.rename(out)
    except BaseException:
        if trash is not None and (trash / out.name).exists() and not out.exists():
            (trash / out.name).rename(out)  # put the previous folder back first
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if trash is not None and out.exists():  # only once the output (new or restored) is in place
            shutil.rmtree(trash, ignore_errors=True)
    WRITTEN.append(out)
    return out


@contextlib.contextmanager
def scratch(prefix: str = "prunekit-") -> Iterator[Path]:
    """A temporary folder for intermediate files (plots), removed on any exit — error or signal included."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
