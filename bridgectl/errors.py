"""Exit codes and the two errors every command may raise; ``bridgectl.main`` turns them into
one line on stderr and an exit code, in one place."""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_GATED = 3  # migrate: some accounts held back; demo and chaos: did not converge/pass


class UsageError(Exception):
    """A user mistake in the arguments; reported as one line, exit code 2."""


class RuntimeFailure(Exception):
    """The command could not do its work (database unreachable, ...); one line, exit 1."""
