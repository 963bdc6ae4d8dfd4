"""The operator token: the credential the SuperLink's control socket asks of every Control API call.

Open-source Flower 1.41 authenticates no ``flwr`` user (its OIDC plugin ships with Flower
Enterprise only), so without this any process that reaches the control socket could list runs with
their configs, submit a run (which every device executes) or register a node key.
fedmaml's SuperLink front (fedmaml/deploy/superlink_server.py) therefore requires
``Authorization: Bearer <token>`` on the Control API, compared in constant time.

The ``flwr`` CLI already sends that header by itself: it does for a connection whose entry in
``$FLWR_HOME/credentials.yaml`` (Flower's file credential store) says the account authentication
type is ``oidc`` and holds an access token. :func:`store_for_flwr` writes that entry (what
``fedmaml deploy connection`` does), so ``flwr run``, ``flwr ls``, ``flwr supernode register``...
work unchanged; the SuperLink's own (no-op) account plugin accepts any bearer token, so only the
front decides. The refresh token Flower also wants is a placeholder: the front never asks the CLI
to refresh (it answers 401 without a ``WWW-Authenticate: Bearer`` challenge).

The token lives in a file readable by its owner only (mode 0600), created at the first start of the
SuperLink; a token file that others can read is refused, as ssh refuses such a private key.
"""

from __future__ import annotations

import hmac
import os
import secrets
import stat
from pathlib import Path

from fedmaml.deploy.crypto import DeployError

#: The file's name, next to the certificates (or in the SuperLink's FLWR_HOME with --insecure).
TOKEN_FILE = "operator.token"
_PLACEHOLDER_REFRESH = "not-used-by-fedmaml"


def ensure_token(path: str | Path) -> str:
    """The token in ``path``, created (mode 0600, 256 random bits) if the file does not exist."""
    path = Path(path).expanduser()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:  # O_EXCL: two starts at once cannot both write it; 0600 from the first byte
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return read_token(path)
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
            f.flush()
            os.fsync(f.fileno())
    return read_token(path)


def read_token(path: str | Path) -> str:
    """The token in ``path``; refuses a missing, empty or group/world-accessible file."""
    path = Path(path).expanduser()
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        raise DeployError(f"operator token file {path} not found (the SuperLink creates it at its "
                          "first start: `fedmaml deploy superlink` prints where)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DeployError(f"operator token file {path} is unreadable: {e}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise DeployError(f"operator token file {path} has mode {stat.S_IMODE(mode):04o}: others "
                          f"can read it; allowed: readable by its owner only (chmod 600 {path})")
    if not text or any(c.isspace() for c in text):
        raise DeployError(f"operator token file {path} holds no token (one line, no spaces, "
                          "expected); delete it and restart the SuperLink to make a new one")
    return text


def authorized(header: bytes | None, token: str) -> bool:
    """Whether an ``Authorization`` header value is ``Bearer <token>`` (constant-time compare)."""
    if not header:
        return False
    scheme, _, value = header.decode("latin-1").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(),
                                                              token.encode())


def store_for_flwr(home: str | Path, address: str, token: str) -> Path:
    """Make the ``flwr`` CLI send ``token`` to ``address`` (the connection's address exactly as in
    config.toml): Flower's credential store in ``<home>/credentials.yaml`` (mode 0600)."""
    from flwr.cli.constant import (ACCESS_TOKEN_STORE_KEY, AUTHN_TYPE_STORE_KEY,
                                   REFRESH_TOKEN_STORE_KEY)
    from flwr.common.constant import AuthnType
    from flwr.supercore.credential_store.file_credential_store import FileCredentialStore

    path = Path(home).expanduser() / "credentials.yaml"
    store = FileCredentialStore(path)
    store.set(AUTHN_TYPE_STORE_KEY % address, AuthnType.OIDC.encode())
    store.set(ACCESS_TOKEN_STORE_KEY % address, token.encode())
    store.set(REFRESH_TOKEN_STORE_KEY % address, _PLACEHOLDER_REFRESH.encode())
    return path
