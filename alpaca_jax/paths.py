"""Where a relative path in the settings points: the repository root.

The configs name the vendored data as `data/...` and are read by Hydra apps that may be started
from any directory (Hydra itself changes nothing with `version_base="1.3"`, but a user's shell
may be anywhere), so a relative path means the file under the repository root. A relative path
that is not there but exists from the working directory is the user's own file; anything else
(a built-in corpus name such as `wiki`, a hub id such as `tatsu-lab/alpaca`) is returned as it
was, for the reader to interpret."""
from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def resolve_path(source: str) -> str:
    """`source` as a path to read: absolute and `~` paths unchanged; a relative path under the
    repository root if it exists there, else from the working directory if it exists there,
    else unchanged (names and hub ids)."""
    path = Path(source).expanduser()
    if path.is_absolute():
        return str(path)
    if (REPO_ROOT / path).exists():
        return str(REPO_ROOT / path)
    return str(path.resolve()) if path.exists() else source
