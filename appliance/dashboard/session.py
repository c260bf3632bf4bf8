"""Dashboard sessions: a signed cookie naming who signed in, and the CSRF token bound to it.

Signing in takes the admin token or an API key once; the cookie then carries only
`{"who": "admin:<fingerprint of the admin token>" | "key:<key id>", "exp": <unix s>, "nonce": ...}`
and an HMAC-SHA256 over it with a key kept in `<state_dir>/dashboard-session-key` (0600,
never logged). Each request looks the signer up again: a revoked key or a changed admin
token ends its sessions at once, and an expired or altered cookie is no session.

The CSRF token is an HMAC of the session's nonce (a different message than the cookie's):
the page carries it, the page's script sends it as `X-CSRF-Token` on every POST, and a
cross-site page can read neither the cookie (HttpOnly, SameSite=Strict) nor the page.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from appliance.records import Store
from appliance.tenancy import ADMIN, Principal

SESSION_KEY_FILE = "dashboard-session-key"
COOKIE_NAME = "cube_dashboard"
COOKIE_PATH = "/dashboard"
SESSION_LIFETIME_S = 12 * 3600


def session_key(state_dir: Path) -> bytes:
    """The signing key, made on first use (mode 0600 from its creation on)."""
    path = state_dir / SESSION_KEY_FILE
    try:
        return bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        pass
    state_dir.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another request made it first
        return bytes.fromhex(path.read_text().strip())
    with os.fdopen(fd, "w") as f:
        f.write(key.hex() + "\n")
    return key


def _fingerprint(admin_token: str) -> str:
    return hashlib.sha256(admin_token.encode()).hexdigest()[:16]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class Session:
    principal: Principal
    nonce: str
    expires_at: float


class Sessions:
    """Issues and checks session cookies; `store` and `admin_token` are the API's own."""

    def __init__(self, key: bytes, store: Store, admin_token: str) -> None:
        self._key = key
        self._store = store
        self._admin_token = admin_token

    def _sign(self, purpose: bytes, payload: bytes) -> str:
        return _b64(hmac.new(self._key, purpose + b"\0" + payload, hashlib.sha256).digest())

    def sign_in(self, credential: str, now: float | None = None) -> str | None:
        """A cookie value for the admin token or a live API key; None for anything else."""
        if hmac.compare_digest(credential.encode(), self._admin_token.encode()):
            who = "admin:" + _fingerprint(self._admin_token)
        else:
            record = self._store.check_api_key(credential)
            if record is None:
                return None
            who = "key:" + record.key_id
        expires = int((now if now is not None else time.time()) + SESSION_LIFETIME_S)
        payload = json.dumps({"who": who, "exp": expires, "nonce": secrets.token_hex(16)}).encode()
        return f"{_b64(payload)}.{self._sign(b'session', payload)}"

    def check(self, cookie: str, now: float | None = None) -> Session | None:
        encoded, _, signature = cookie.partition(".")
        try:
            payload = _unb64(encoded)
            data = json.loads(payload)
            who, expires, nonce = str(data["who"]), float(data["exp"]), str(data["nonce"])
        except (ValueError, KeyError, TypeError):
            return None
        if not hmac.compare_digest(signature, self._sign(b"session", payload)):
            return None
        if expires < (now if now is not None else time.time()):
            return None
        principal = self._principal(who)
        return Session(principal, nonce, expires) if principal is not None else None

    def _principal(self, who: str) -> Principal | None:
        kind, _, ident = who.partition(":")
        if kind == "admin":
            return ADMIN if hmac.compare_digest(ident, _fingerprint(self._admin_token)) else None
        for record in self._store.list_api_keys():
            if kind == "key" and record.key_id == ident and record.revoked_at is None:
                return Principal(record.name, record.team_id)
        return None

    def csrf_token(self, session: Session) -> str:
        return self._sign(b"csrf", session.nonce.encode())

    def csrf_ok(self, session: Session, presented: str) -> bool:
        return bool(presented) and hmac.compare_digest(presented, self.csrf_token(session))
