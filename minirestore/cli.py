"""What the command-line tools share: their --help layout and how a UserError reaches the user."""
import argparse
import os
import sys
import tempfile
from pathlib import Path

from . import UserError


class Help(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each default, except where there is none or the help text already explains it."""

    def _get_help_string(self, action):
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)



def spin_period(text):
    """--spin's type (sample.py, evaluate, train.py, the benchmarks): a whole number of pixels, 0 meaning off;
    a negative one is a one-line UserError (argparse lets it through to `run`)."""
    value = int(text)
    if value < 0:
        raise UserError(f"--spin must be 0 (off) or a shift period in pixels, got {value}")
    return value

def run(main):
    """sys.exit(main()), with a UserError printed as one line (naming the rank under torchrun), exit code 2."""
    try:
        sys.exit(main())
    except UserError as e:
        rank = f"[rank {os.environ['RANK']}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        print(f"error: {rank}{e}", file=sys.stderr)
        sys.exit(2)


def writable_folder(folder, flag="--out"):
    """Create `folder` (and its parents) and check that a file can be written in it, before any work:
    an unwritable place is a one-line UserError now rather than a traceback after the work."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UserError(f"cannot write in {folder} ({e.strerror or e}): choose another {flag}") from None
    return folder
