"""Files that training writes whole or not at all: checkpoints, logs, cached teacher embeddings, noisy copies,
BM3D results. (No torch here: the evaluation script writes through it too.)"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def durable_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """``write`` into a temporary file, flushed to disk, then renamed over ``path``: a kill or a power loss leaves
    the old file or the new one, never a torn one (a rename can reach the disk before unsynced data)."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as file:
        write(file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself
    finally:
        os.close(directory)
