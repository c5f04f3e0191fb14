"""``bridgectl``: the command line of the migration, and the composition root.

``main`` builds the parser from one module per command group (``cmd_*.py``: each owns its
argparse section and its command functions), dispatches, and turns errors into exit codes in
one place. How a command runs (the reactor, the service tree, signals, logging) is
``bridgectl.runtime``, the only code that touches the global reactor.

Exit codes: 0 success, 1 runtime failure (e.g. a port in use), 2 bad arguments,
3 (migrate, cohort advance) some accounts held back by the migration gates; (demo) did not
converge; 4 and 5 (reconcile) the lock was taken, the reconcilers are paused.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from bridge import state
from bridge.ops import build
from bridgectl import (
    cmd_accounts,
    cmd_bridge,
    cmd_chaos,
    cmd_cloud,
    cmd_cohort,
    cmd_control,
    cmd_db,
    cmd_demo,
    cmd_findings,
    cmd_freeze,
    cmd_legacy,
    cmd_migrate,
    cmd_reconcile,
    cmd_simulate,
    cmd_status,
    runtime,
)
from bridgectl.errors import (  # noqa: F401 - the exit codes, for callers of main()
    EXIT_FAILURE,
    EXIT_GATED,
    EXIT_OK,
    EXIT_USAGE,
    RuntimeFailure,
    UsageError,
)

#: The command groups, in the order ``bridgectl --help`` lists them.
GROUPS = (cmd_legacy, cmd_db, cmd_cloud, cmd_bridge, cmd_migrate, cmd_cohort, cmd_freeze,
          cmd_control, cmd_status, cmd_accounts, cmd_findings, cmd_reconcile, cmd_demo,
          cmd_chaos, cmd_simulate)

Handler = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bridgectl",
        description="Dual-stack migration bridge: legacy supernode network <-> cloud service.")
    p.add_argument("--version", action="version", version=f"%(prog)s {build.version()}",
                   help="print the version of bridgectl (the installed package) and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for group in GROUPS:
        group.add_commands(sub)
    return p


def commands(parser: argparse.ArgumentParser | None = None) -> dict[tuple[str, str | None],
                                                                     Handler]:
    """``(command, subcommand or None) -> handler`` of every command the parser knows."""
    found: dict[tuple[str, str | None], Handler] = {}

    def walk(p: argparse.ArgumentParser, path: tuple[str, ...]) -> None:
        handler = p.get_default("handler")
        if handler is not None:
            found[(path[0], path[1] if len(path) > 1 else None)] = handler
        for action in p._actions:  # argparse keeps its subparsers there, nowhere public
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    walk(child, (*path, name))

    walk(parser or build_parser(), ())
    return found


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``bridgectl``; returns the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (UsageError, RuntimeFailure, state.StateError) as e:
        # one line; a JSON log event once a command logs JSON (--log-format json)
        runtime.say(f"bridgectl: error: {e}", error=True)
        return EXIT_USAGE if isinstance(e, UsageError) else EXIT_FAILURE
    except KeyboardInterrupt:
        return 130


def console_main() -> None:
    """Console-script wrapper: exit with ``main``'s code."""
    sys.exit(main())


if __name__ == "__main__":
    console_main()
