"""Files written whole or not at all: a process killed while writing leaves the file as it was before, or the new
one, never a cut-short file that a later run would read (or refuse). Every writer of results, checkpoints' side
files, exported weights and images goes through `written_whole`."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


@contextlib.contextmanager
def written_whole(path: str | os.PathLike) -> Iterator[str]:
  """Yields a temporary path beside `path` (`path` + ".tmp") to write to; once the block ends without an error,
  the temporary file replaces `path` (`os.replace`: atomic on POSIX and Windows)."""
  path = os.fspath(path)
  tmp = path + ".tmp"
  yield tmp
  os.replace(tmp, path)
