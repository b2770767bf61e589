"""minirestore: a frozen diffusion transformer learns to restore through one prompt (arXiv 2604.04924)."""

__version__ = "0.1.0"


class UserError(Exception):
    """A mistake the user can fix (missing file, wrong checkpoint, bad flag).

    The command-line tools print its message as one line and exit non-zero; library callers
    can catch it. The message says what is wrong and what to do.
    """
