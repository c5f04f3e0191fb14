"""Argument types and options shared by the command groups: each checks its value while
argparse parses, so a bad value is one clear usage error (exit 2) before anything runs."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from bridge import state
from bridgectl.errors import UsageError


def non_negative_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"{text} must not be negative")
    return v


def port(text: str) -> int:
    """A TCP port, 0 (any free port) to 65535."""
    v = non_negative_int(text)
    if v > 65535:
        raise argparse.ArgumentTypeError(f"{text} is not a port (0-65535)")
    return v


def number(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return v


def fraction(text: str) -> float:
    v = number(text)
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not a fraction between 0 and 1")
    return v


def host_port(text: str) -> tuple[str, int]:
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return host, int(port_text)


def duration_ms(text: str) -> int:
    """'90s', '15m', '12h', '30d' (or plain seconds) -> milliseconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    value_text, unit = (text[:-1], text[-1]) if text[-1:] in units else (text, "s")
    try:
        value = float(value_text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 90m, 12h or 30d"
                                         ) from None
    if not 0 < value < 10 * 365 * 86400:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return int(value * units[unit] * 1000)


def add_group(sub: Any, name: str, *, help: str, description: str) -> Any:  # noqa: A002
    """A command group (``bridgectl NAME SUBCOMMAND``) whose subcommand is required."""
    group = sub.add_parser(name, help=help, description=description)
    subcommands = group.add_subparsers(dest=f"{name}_command", metavar="SUBCOMMAND")
    subcommands.required = True
    return subcommands


def add_dsn_option(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--dsn", metavar="DSN",
                    help="PostgreSQL connection string (default: $BRIDGE_DSN, else the "
                         "embedded server under $BRIDGE_HOME)")


def add_log_format_option(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--log-format", choices=("text", "json"), default="text",
                    metavar="FORMAT",
                    help="how stderr logs: text lines (default), or json: one JSON object "
                         "per line (Twisted's jsonFileLogObserver, plus text), for a log "
                         "shipper")


def add_peer_secret_option(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--peer-secret-file", type=Path, metavar="FILE",
                    help="shared secret for privileged peers (default: from $BRIDGE_HOME)")


def peer_secret(args: argparse.Namespace) -> bytes:
    """The privileged peers' secret: ``--peer-secret-file`` when given (and the command has
    it), else the one in ``$BRIDGE_HOME`` (created on first use)."""
    path = getattr(args, "peer_secret_file", None)
    if path is not None:
        return state.read_secret_file(path)
    return state.secret(state.state_home(), "peer")


def actor(args: argparse.Namespace) -> str:
    """Who acts, for the audit log: ``--actor``, else the OS user; a usage error when neither
    gives 1-200 printable characters."""
    name = args.actor
    if name is None:
        import getpass

        try:
            name = getpass.getuser()
        except Exception:  # no login name in this environment (KeyError, OSError)
            raise UsageError("cannot tell who you are for the audit log; "
                             "pass --actor NAME") from None
    if not 0 < len(name) <= 200 or any(ord(c) < 32 for c in name):
        raise UsageError("--actor must be 1-200 printable characters")
    return name


def account_file(path: Path) -> tuple[str, ...]:
    """The handles or account ids in *path*, one per line (``#`` starts a comment, blank
    lines skipped); a usage error when it can not be read."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read --file {path}: {getattr(e, 'strerror', e)}") from None
    refs = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    return tuple(r for r in refs if r)
