"""Two chat tasks built from the Python standard library's own docstrings (no downloads).

Each public top-level function of a stdlib module (``<stdlib>/*.py``, read with ``ast``, never
imported) whose docstring opens with a short sentence gives one ``Function``: module, name,
argument list and that first sentence. Two tasks ask about it in opposite directions:

``docstring``  "What does `textwrap.dedent(text)` do?" -> the docstring's first sentence
``signature``  "Which standard-library function does this: <first sentence>" -> `module.name(args)`

An instruct model answers the first in a chatty paragraph and guesses at the second; a LoRA
adapter per task learns the terse docstring voice and the call format, a change one can see in a
greedy generation. Held-out examples come from other modules than the training ones. The set
is deterministic on a given Python version (about 500 functions from 86 modules on 3.11).
"""

from __future__ import annotations

import ast
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path

TASKS = ("docstring", "signature")
SYSTEM = "You are a helpful assistant."
_FIRST_SENTENCE = re.compile(r"(.+?\.)(?:\s|$)")


@dataclass(frozen=True)
class Function:
    """A documented stdlib function: ``module.name(args)`` and its docstring's first sentence."""

    module: str
    name: str
    args: str
    summary: str

    @property
    def call(self) -> str:
        return f"{self.module}.{self.name}({self.args})"


def _summary(docstring: str) -> str | None:
    """The first sentence of the docstring's first paragraph on one line, or None if it is not a
    short plain-ASCII sentence starting with a capital letter."""
    paragraph = " ".join(docstring.split("\n\n")[0].split())
    match = _FIRST_SENTENCE.match(paragraph)
    if match is None:
        return None
    sentence = match.group(1)
    if not (15 <= len(sentence) <= 100 and sentence.isascii() and sentence[0].isupper()):
        return None
    return sentence


def stdlib_functions() -> list[Function]:
    """Every usable ``Function`` of the top-level stdlib modules, in module and source order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    functions = []
    for path in sorted(p for p in stdlib.glob("*.py") if not p.name.startswith("_")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):  # a module this Python cannot parse
            continue
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
                continue
            summary = _summary(ast.get_docstring(node) or "")
            args = ast.unparse(node.args)
            if summary is not None and len(args) <= 40:
                functions.append(Function(path.stem, node.name, args, summary))
    return functions


def split_by_module(functions: list[Function], held_out_every: int = 5) -> tuple[list[Function], list[Function]]:
    """``(train, held_out)``: every ``held_out_every``-th module (in sorted order) is held out whole,
    so held-out questions are about modules the adapter never saw."""
    modules = sorted({f.module for f in functions})
    held = set(modules[held_out_every - 1::held_out_every])
    return [f for f in functions if f.module not in held], [f for f in functions if f.module in held]


def conversation(task: str, function: Function) -> tuple[list[dict], str]:
    """``(messages, answer)``: the chat messages up to the user's question, and the assistant's
    answer for ``task`` (one of ``TASKS``)."""
    if task == "docstring":
        question, answer = f"What does `{function.call}` do?", function.summary
    elif task == "signature":
        question, answer = f"Which Python standard-library function does this: {function.summary}", \
            f"`{function.call}`"
    else:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}], answer
