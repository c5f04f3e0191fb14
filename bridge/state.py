"""The state directory (``$BRIDGE_HOME``, default ``./.bridge``).

It holds what processes on one machine must agree on without flags: generated secrets
(created on first use, mode 0600) and, later, the embedded database.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from pathlib import Path

DEFAULT_HOME = ".bridge"


class StateError(Exception):
    """The state directory or a file in it is unusable; the message says what to do."""


def state_home(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    return Path(env.get("BRIDGE_HOME") or DEFAULT_HOME)


def ensure_home(home: Path) -> Path:
    try:
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise StateError(f"cannot create state directory {home}: {e.strerror}") from e
    return home


def read_secret_file(path: Path) -> bytes:
    """A secret from a file given by the operator: non-empty, surrounding whitespace ignored."""
    try:
        data = path.read_bytes().strip()
    except OSError as e:
        raise StateError(f"cannot read secret file {path}: {e.strerror}") from e
    if len(data) < 16:
        raise StateError(f"secret file {path} must hold at least 16 bytes")
    return data


def secret(home: Path, name: str) -> bytes:
    """The named secret, generated on first use. Safe when several processes race to create
    it: the file appears atomically (write a temp file, then hard-link it into place)."""
    ensure_home(home)
    path = home / f"{name}.secret"
    if not path.exists():
        tmp = home / f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, secrets.token_hex(32).encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process won the race; use its secret
        finally:
            tmp.unlink()
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise StateError(f"{path} is readable by others (mode {mode:o}); chmod 600 it")
    return read_secret_file(path)
