"""Text domains every Python install ships, as byte sequences (no downloads).

``code``        Python standard-library modules (held out: other modules),
``prose``       English: Python's LICENSE text, the Zen of Python, the prose paragraphs of
                ``pydoc_data.topics`` (held out: other paragraphs),
``arithmetic``  synthetic ``a+b=c`` / ``a*b=c`` lines (held out: another random stream).

Used by the forgetting benchmark and the demo; deterministic on a given Python version.
"""

from __future__ import annotations

import random
import sysconfig
from pathlib import Path

import torch

DOMAINS = ("code", "prose", "arithmetic")


def _stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def _stdlib_modules() -> list[Path]:
    """Top-level stdlib modules, sorted by name (the same list on every machine with this Python)."""
    return sorted(p for p in _stdlib().glob("*.py") if not p.name.startswith("_"))


def _doc_paragraphs() -> list[str]:
    """The paragraphs of ``pydoc_data.topics`` (Python's reference docs as plain text)."""
    from pydoc_data.topics import topics

    return [p.strip() for key in sorted(topics) for p in topics[key].split("\n\n") if p.strip()]


def _is_prose(paragraph: str) -> bool:
    letters = sum(c.isalpha() or c == " " for c in paragraph)
    return len(paragraph) > 200 and letters / len(paragraph) > 0.9 and not paragraph.startswith(" ")


def _take(texts: list[str], n_bytes: int) -> bytes:
    """Concatenate ``texts`` until ``n_bytes`` (ASCII only; other bytes dropped)."""
    out = bytearray()
    for text in texts:
        out += text.encode("ascii", errors="ignore") + b"\n"
        if len(out) >= n_bytes:
            break
    return bytes(out[:n_bytes])


def _arithmetic(n_bytes: int, seed: int) -> bytes:
    rng = random.Random(seed)
    lines = []
    while sum(map(len, lines)) < n_bytes:
        a, b = rng.randrange(1000), rng.randrange(1000)
        lines.append(f"{a}+{b}={a + b}\n" if rng.random() < 0.5 else f"{a % 100}*{b % 100}={(a % 100) * (b % 100)}\n")
    return "".join(lines).encode()[:n_bytes]


def build_corpora(n_bytes: int) -> tuple[bytes, dict[str, tuple[bytes, bytes]]]:
    """``(pretraining text, {domain: (train, held_out)})``, deterministic.

    Modules are split four ways (pretraining / code-train / code-held-out by position), doc
    paragraphs into prose (train / held-out) and non-prose (pretraining).
    """
    modules = [_read(p) for p in _stdlib_modules()]
    paragraphs = _doc_paragraphs()
    prose = [p for p in paragraphs if _is_prose(p)]
    other_docs = [p for p in paragraphs if not _is_prose(p)]
    license_and_zen = [_read(_stdlib() / "LICENSE.txt"), _zen()]
    held = n_bytes // 8
    pretrain = _take(modules[0::4], n_bytes) + _take(other_docs, n_bytes)
    domains = {
        "code": (_take(modules[1::4], n_bytes), _take(modules[3::4], held)),
        "prose": (_take(license_and_zen + prose[0::2], n_bytes), _take(prose[1::2], held)),
        "arithmetic": (_arithmetic(n_bytes, seed=1), _arithmetic(held, seed=2)),
    }
    return pretrain, domains


def _zen() -> str:
    import codecs
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        import this  # noqa: F401  (prints the Zen on first import)
    return codecs.decode(this.s, "rot13")


def to_tensor(data: bytes) -> torch.Tensor:
    """int64 ``[len(data)]`` byte values."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def random_batch(data: torch.Tensor, batch: int, context: int, gen: torch.Generator) -> torch.Tensor:
    """int64 ``[batch, context + 1]``: random windows of the byte tensor ``data``."""
    starts = torch.randint(0, data.numel() - context - 1, (batch,), generator=gen)
    return torch.stack([data[s:s + context + 1] for s in starts.tolist()])


def eval_windows(data: torch.Tensor, count: int, context: int) -> torch.Tensor:
    """int64 ``[count, context + 1]``: evenly spaced windows of ``data`` (a fixed held-out set)."""
    starts = torch.linspace(0, data.numel() - context - 2, count).long()
    return torch.stack([data[s:s + context + 1] for s in starts.tolist()])
