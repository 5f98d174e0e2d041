"""Where the commands write when no folder is given: one folder in the current directory.

``lora-triton demo``, ``forgetting`` and ``bench`` write under ``DEFAULT_ROOT/<command>``;
the repository's ``.gitignore`` lists ``DEFAULT_ROOT``, so runs in a checkout leave git clean.
``QUICK_NOTE`` is the line every ``--quick`` run prints (and puts in its plots' titles);
``format_bytes`` how every command prints a size; ``writable_dir`` checks an output folder before any
work.
"""

from __future__ import annotations

import os

DEFAULT_ROOT = "lora_triton_out"
#: What every ``--quick`` output says about its numbers.
QUICK_NOTE = "--quick: a smoke test at tiny sizes; its numbers are not measurements"


def default_dir(command: str) -> str:
    """The default output folder of ``command`` (``"demo"``, ``"forgetting"``, ``"bench"``)."""
    return os.path.join(DEFAULT_ROOT, command)


def format_bytes(nbytes: int) -> str:
    """Bytes in the largest unit that keeps the number at least 1 (B, KiB, MiB, GiB), two decimals."""
    for unit, name in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if nbytes >= unit:
            return f"{nbytes / unit:.2f} {name}"
    return f"{nbytes} B"


def writable_dir(path: str, command: str, flag: str = "--out-dir") -> str:
    """``path`` created if needed and writable, checked before any work; ``SystemExit`` saying so otherwise."""
    import tempfile

    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
    except OSError as err:
        raise SystemExit(f"lora-triton {command}: cannot write to the output folder {path!r} "
                         f"({err.strerror or err}); pass a writable folder with {flag}") from None
    return path
