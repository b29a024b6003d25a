"""Atomic output folders: everything is written to a temporary sibling folder, then renamed into place."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from prunekit.errors import PrunekitError


def check_output_dir(output_dir: str | Path, overwrite: bool, source: str | None = None) -> Path:
    """Refuse an existing folder unless ``overwrite``; never allow the source model's folder."""
    out = Path(output_dir).expanduser().resolve()
    if source is not None and Path(source).expanduser().exists() and Path(source).expanduser().resolve() == out:
        raise PrunekitError(f"output folder {out} is the source model's folder; the source is never overwritten")
    if out.exists() and not overwrite:
        raise PrunekitError(f"output folder {out} already exists; choose another --output_dir or pass --overwrite true")
    if out.exists() and not out.is_dir():
        raise PrunekitError(f"output path {out} exists and is not a folder")
    return out


def write_atomically(output_dir: str | Path, overwrite: bool, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a fresh temporary folder beside ``output_dir``, then move it into place.

    On any error the temporary folder is removed and an existing ``output_dir`` is left untouched.
    """
    out = check_output_dir(output_dir, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(tmp)
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            out.rename(trash / out.name)
            tmp.rename(out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
