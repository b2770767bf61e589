"""Atomic file writes: a file is there whole, or not at all.

A program stopped while it writes (Ctrl-C, a full disk, the out-of-memory killer, a preempted GPU job) leaves
half a file: a checkpoint that no longer loads, an image cut short, a weights file whose header promises
tensors that are not there. When it was overwriting, the good old file is lost as well. So every file is
first written under a temporary name beside the target and then renamed over it with os.replace: on one
filesystem a rename is atomic, so a reader sees the old file or the new one, never a mix.

This module imports nothing of the package, so every module can use it.
"""

import os
import shutil
import tempfile
from pathlib import Path


def atomic_write(path, write):
    """write(tmp) writes the file at tmp, a Path; then it is renamed to `path` -> path.

    tmp has path's own name, inside a hidden temporary folder beside it (same filesystem, so the rename is
    atomic): a writer that picks the format by the suffix (PIL, numpy) writes the right one, the file gets a
    normal mode (the umask's, as with open), and a half file left by a hard kill hides in a folder that no
    "*.safetensors" or "*.jpg" listing picks up. On any failure, Ctrl-C included, the temporary folder is
    removed and an existing `path` stays as it was."""
    path = Path(path)
    tmp_dir = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        tmp = tmp_dir / path.name
        write(tmp)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return path
