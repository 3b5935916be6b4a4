"""Writing results safely: atomic file writes, JSON without bare NaN, and output paths checked before the work.

Every file anchor writes goes through :func:`atomic_write`: the content goes to a temporary file in the same
directory, which then replaces the target in one ``os.replace``. A run killed mid-write leaves the old file (or
none), never half of one. Commands check their output paths with :func:`check_output_file` and
:func:`check_output_dir` *before* loading a model, so a bad ``--out`` costs seconds, not the whole run, and a
result already there is only replaced when the user says so.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_write", "atomic_write_json", "atomic_write_jsonl", "atomic_write_text", "check_output_dir",
    "check_output_file", "nan_to_none", "read_utf8",
]


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """Call ``write(tmp)`` to fill a temporary file beside ``path``, then move it onto ``path`` in one step.

    The temporary name keeps ``path``'s suffix, so writers that infer a format from it (matplotlib's
    ``savefig``, safetensors) work unchanged. The parent directory is created. Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.stem}-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _dumps(value: Any, where: Path, **kwargs: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False, **kwargs)
    except ValueError as err:  # a NaN or infinity: not JSON, and other tools would fail to read the file
        raise ValueError(f"refusing to write a non-finite number into {where}: {err}. Convert missing values "
                         "with anchor.io.nan_to_none.") from None


def atomic_write_json(path: str | os.PathLike, value: Any, indent: int | None = 1) -> Path:
    """Write ``value`` as strict JSON (a NaN or infinity raises ValueError) to ``path`` atomically."""
    path = Path(path)
    return atomic_write_text(path, _dumps(value, path, indent=indent) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, records: Iterable[Any]) -> Path:
    """Write one strict-JSON record per line to ``path`` atomically."""
    path = Path(path)
    return atomic_write_text(path, "".join(_dumps(r, path) + "\n" for r in records))


def nan_to_none(value: Any) -> Any:
    """``value`` with every float NaN replaced by None, recursively through dicts, lists and tuples.

    anchor uses NaN in memory for a value that does not exist (the projection of an empty reply, the spread of a
    single value); JSON's name for that is ``null``. Infinities are left alone, so writing them still fails.
    """
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, Mapping):
        return {k: nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [nan_to_none(v) for v in value]
    return value


def read_utf8(path: str | os.PathLike) -> str:
    """The text of ``path``; a file that is not UTF-8 is refused with its name and the first bad byte."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start}); "
                         "save it as UTF-8 and run again.") from None


def check_output_file(path: str | os.PathLike, flag: str = "--out", overwrite: bool = False) -> Path:
    """Refuse, before any work, an output file path that cannot be written or would replace a result.

    ``flag`` names the option in the messages. An existing file is refused unless ``overwrite`` (the command's
    ``--overwrite``); a directory, or a parent that is a file, always is.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{flag} {path} is a directory; {flag} names a file, e.g. {path / 'out.json'}.")
    _check_parent(path, flag)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{flag} {path} already exists; pass --overwrite to replace it, or choose a new name.")
    return path


def check_output_dir(path: str | os.PathLike, names: Iterable[str], flag: str = "--out",
                     overwrite: bool = False) -> Path:
    """Refuse, before any work, an output directory that is a file or already holds one of the files ``names``.

    Other files in the directory are left alone and do not count; ``overwrite`` allows replacing ``names``.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{flag} {path} is a file; {flag} names a directory for the results.")
    _check_parent(path, flag)
    taken = sorted(name for name in names if (path / name).exists())
    if taken and not overwrite:
        raise FileExistsError(f"{flag} {path} already holds {', '.join(taken)}; pass --overwrite to replace them, or "
                              "choose another directory.")
    return path


def _check_parent(path: Path, flag: str) -> None:
    """The nearest existing ancestor of ``path`` must be a writable directory."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(f"{flag} {path}: {parent} is a file, so nothing can be written below it.")
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"{flag} {path}: {parent} is not writable; choose a directory you can write to.")
