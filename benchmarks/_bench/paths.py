"""Machine-independent spellings of file paths in what the harness writes (results get committed and shared)."""

from __future__ import annotations

import re
from pathlib import Path, PurePath

REPO_ROOT = Path(__file__).resolve().parents[2]

_TRACEBACK_FILE = re.compile(r'File "([^"]+)"')
_PACKAGE_DIRS = ("site-packages", "dist-packages")


def portable_path(path: str, keep: int = 3) -> str:
    """``path`` relative to the repository when inside it, from its package directory when installed, else its
    last ``keep`` components; relative paths are returned as they are."""
    parts = PurePath(path)
    if not parts.is_absolute():
        return path
    if parts.is_relative_to(REPO_ROOT):
        return parts.relative_to(REPO_ROOT).as_posix()
    names = parts.parts
    for marker in _PACKAGE_DIRS:
        if marker in names:
            return ".../" + "/".join(names[len(names) - names[::-1].index(marker):])
    return ".../" + "/".join(names[-keep:])


def portable_traceback(text: str) -> str:
    """A formatted traceback with every ``File "..."`` path made portable."""
    return _TRACEBACK_FILE.sub(lambda m: f'File "{portable_path(m.group(1))}"', text)


def portable_command(argv: list[str]) -> str:
    """The command line that started the run, with absolute paths outside the repository cut to their name."""
    return " ".join(["python", "benchmarks/compare.py", *(portable_path(a, keep=1) for a in argv)])
