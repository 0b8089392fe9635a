"""Errors that end a run, each carrying the exit code the CLI returns.

Exit codes tell findings from failures: 0 no finding at or above ``--fail-on``,
1 findings, 2 usage error, 3 input error (file, checkpoint, data, architecture),
4 internal error (a bug in bncheck).

Messages name what the caller can change. The same error reaches Python callers and
command-line users, so a message refers to a setting as ``$name`` (``$batch_size``,
``$data``): ``str(error)`` spells it as the Python argument (``batch_size``), and
``error.for_cli()`` as the flag (``--batch-size``).
"""

from __future__ import annotations

from enum import IntEnum
from string import Template

# Python argument -> command-line flag, for every setting an error message may name.
FLAGS = {
    "data": "--data",
    "batch_size": "--batch-size",
    "num_batches": "--num-batches",
    "num_samples": "--num-samples",
    "arch": "--arch",
    "arch_kwargs": "--arch-kwargs",
    "trust_checkpoint": "--trust-checkpoint",
    "device": "--device",
    "layers": "--layers",
    "out": "--out",
    "force": "--force",
    "attribute": "--attribute",
    "fail_on": "--fail-on",
    "weights": "--weights",
    "output": "--output",
}


ERROR_DETAIL_LIMIT = 200
"""Longest piece of a third-party error message quoted inside one of ours."""


def first_line(error: object, limit: int = ERROR_DETAIL_LIMIT) -> str:
    """The first non-empty line of an exception (or text), cut to ``limit`` characters, ready
    to quote inside a one-line message (``$`` escaped for the settings template)."""
    text = str(error).strip()
    line = next((part.strip() for part in text.splitlines() if part.strip()), "")
    if not line:
        line = type(error).__name__ if isinstance(error, BaseException) else ""
    if len(line) > limit:
        line = line[: limit - 3].rstrip() + "..."
    return line.replace("$", "$$")


class ExitCode(IntEnum):
    OK = 0
    FINDINGS = 1
    USAGE = 2
    INPUT = 3
    INTERNAL = 4


class _Names(dict):
    """Leaves unknown ``$words`` (and a lone ``$``) as they were."""

    def __missing__(self, key: str) -> str:
        return "$" + key


def spell(template: str, *, cli: bool) -> str:
    names = _Names({name: (flag if cli else name) for name, flag in FLAGS.items()})
    return Template(template).safe_substitute(names)


class BncheckError(Exception):
    """An error the user can fix; ``str(err)`` is one line naming the problem and the fix."""

    exit_code: ExitCode = ExitCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.template = message

    def __str__(self) -> str:
        return spell(self.template, cli=False)

    def for_cli(self) -> str:
        """The message with settings spelled as command-line flags."""
        return spell(self.template, cli=True)


class UsageError(BncheckError, ValueError):
    """Flags, arguments or config that cannot work together (exit 2)."""

    exit_code = ExitCode.USAGE


class InputError(BncheckError):
    """A file, checkpoint, architecture or data source that cannot be used (exit 3)."""

    exit_code = ExitCode.INPUT


class InternalError(BncheckError):
    """bncheck broke its own promise, e.g. the model changed during a run (exit 4)."""

    exit_code = ExitCode.INTERNAL
