"""Errors that end a run, each carrying the exit code the CLI returns.

Exit codes tell findings from failures: 0 no finding at or above ``--fail-on``,
1 findings, 2 usage error, 3 input error (file, checkpoint, data, architecture),
4 internal error (a bug in bncheck).
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    FINDINGS = 1
    USAGE = 2
    INPUT = 3
    INTERNAL = 4


class BncheckError(Exception):
    """An error the user can fix; ``str(err)`` is one line naming the problem and the fix."""

    exit_code: ExitCode = ExitCode.INTERNAL


class UsageError(BncheckError):
    """Flags or config that cannot work together (exit 2)."""

    exit_code = ExitCode.USAGE


class InputError(BncheckError):
    """A file, checkpoint, architecture or data source that cannot be used (exit 3)."""

    exit_code = ExitCode.INPUT


class InternalError(BncheckError):
    """bncheck broke its own promise, e.g. the model changed during a run (exit 4)."""

    exit_code = ExitCode.INTERNAL
