"""The token a cluster's head checks: where it lives, keeping it private (0600), the header a client sends.

Whoever holds the token can run any command on the cluster through the Jobs API, so the file is created
0600 before Ray would create it (0644 under the usual umask) and made private when found wider.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from distmerge.jobs.errors import ClusterError

if TYPE_CHECKING:
    from distmerge.jobs.local_cluster import ClusterState

LOG = logging.getLogger(__name__)


def default_token_path(environ: Mapping[str, str] = os.environ) -> Path:
    """Where Ray looks for the token when neither RAY_AUTH_TOKEN nor RAY_AUTH_TOKEN_PATH is set."""
    home = environ.get("HOME")
    return (Path(home) if home else Path.home()) / ".ray" / "auth_token"


def token_file(environ: Mapping[str, str] = os.environ) -> Path:
    return Path(environ.get("RAY_AUTH_TOKEN_PATH") or default_token_path(environ)).expanduser()


def token_at_hand(environ: Mapping[str, str] = os.environ) -> Optional[str]:
    """The token Ray's client would send in token mode (RAY_AUTH_TOKEN, the RAY_AUTH_TOKEN_PATH file,
    ~/.ray/auth_token, in Ray's order), or None when none holds one."""
    if environ.get("RAY_AUTH_TOKEN", "").strip():
        return environ["RAY_AUTH_TOKEN"].strip()
    return _read_token(token_file(environ))


def _read_token(path: Path) -> Optional[str]:
    try:
        token = path.expanduser().read_text().strip()
    except OSError:
        return None
    return token or None


def make_token_private(path: Path) -> Optional[int]:
    """Make the token file readable by its owner only: whoever reads it can run code on the cluster. Returns the
    mode it had when that was wider (the caller says so), None when it was already private or is missing."""
    try:
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError:
        return None
    if not mode & 0o077:
        return None
    try:
        os.chmod(path, 0o600)
    except OSError as exc:
        raise ClusterError(f"token file '{path}' is readable by other users (mode {mode:04o}) and cannot be made "
                           f"private ({exc.strerror}): chmod 600 it, or point RAY_AUTH_TOKEN_PATH at a private "
                           "copy") from None
    LOG.warning("token file '%s' was readable by other users (mode %04o); made it 0600", path, mode)
    return mode


def ensure_token_file(environ: Mapping[str, str] = os.environ) -> Optional[Path]:
    """The token file a new head reads: created 0600 when missing (Ray itself would create it 0644 under the
    usual umask), made 0600 when it is wider. None when RAY_AUTH_TOKEN holds the token."""
    path = token_file(environ)
    if environ.get("RAY_AUTH_TOKEN", "").strip():
        make_token_private(path)  # not used by this head, but it still lets others in
        return None
    if _read_token(path) is None:
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_hex(32))  # what `ray get-auth-token --generate` writes: 256 random bits
        except OSError as exc:
            raise ClusterError(f"token file '{path}' cannot be created ({exc.strerror}); point RAY_AUTH_TOKEN_PATH "
                               "at a writable place or set RAY_AUTH_TOKEN") from None
    make_token_private(path)
    return path


def auth_headers(*, local: Optional[ClusterState] = None, token_path: Optional[Path] = None,
                 environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The Authorization header for a token-auth cluster, from (in order) RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH,
    the given token file, the local cluster's token file, ~/.ray/auth_token. None with RAY_AUTH_MODE=disabled.
    A head started with plain ``ray start --head`` uses ~/.ray/auth_token without being told, so a token at hand
    is sent even when RAY_AUTH_MODE is unset (Ray's own client would not, and the head would refuse)."""
    if environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return {}
    token = environ.get("RAY_AUTH_TOKEN", "").strip() or None
    if token is None and environ.get("RAY_AUTH_TOKEN_PATH"):
        token = _read_token(Path(environ["RAY_AUTH_TOKEN_PATH"]))
    if token is None and token_path is not None:
        token = _read_token(token_path)
    if token is None and local is not None and local.token_path:
        token = _read_token(Path(local.token_path))
    if token is None:
        token = _read_token(default_token_path(environ))
    return {"Authorization": f"Bearer {token}"} if token else {}
