"""Command-line conventions shared by ``kvstore`` and its subcommands.

* :class:`Parser`: an ``argparse.ArgumentParser`` whose description (usually the module docstring) is shown
  without reST markup, and whose usage errors are one line on stderr with exit status 2.
* :class:`UsageError`: raised for a user error found after parsing (e.g. a combination of options); the
  ``kvstore`` entry point prints it as one line and exits 2, without a traceback.
* :func:`positive_int`: an argparse ``type=`` check.
"""
from __future__ import annotations

import argparse
import re
from typing import NoReturn

__all__ = ["Parser", "UsageError", "plain_text", "positive_int"]


class UsageError(Exception):
    """A mistake in how a command was called: reported as one line, exit status 2."""


_ROLE = re.compile(r":(?:mod|class|func|meth|data|attr|obj|exc):`~?([^`]+)`")
_LITERAL = re.compile(r"``([^`]+)``")
_STRONG = re.compile(r"\*\*([^*]+)\*\*")


def plain_text(doc: str) -> str:
    """A docstring as terminal text: ``literal`` -> literal, :class:`~a.B` -> B (:mod:`a.b` -> a.b),
    **strong** -> strong, and a paragraph's closing ``::`` -> ``:``."""
    def role(m: re.Match) -> str:
        name = m.group(1)
        return name.rsplit(".", 1)[-1] if m.group(0).startswith((":class:`~", ":func:`~", ":meth:`~")) else name

    text = _ROLE.sub(role, doc)
    text = _LITERAL.sub(r"\1", text)
    text = _STRONG.sub(r"\1", text)
    return re.sub(r"::$", ":", text, flags=re.M)


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with the description as plain text (paragraphs kept) and one-line errors."""

    def __init__(self, *args, description: str | None = None, **kwargs) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, description=None if description is None else plain_text(description).strip(),
                         **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value

