"""Registry authentication: the WWW-Authenticate challenge, bearer tokens, basic credentials.

Flow (distribution spec): a request answered 401 carries `WWW-Authenticate:
Bearer realm=...,service=...,scope=...` (or `Basic realm=...`). For Bearer we ask
the realm for a token for our scope, anonymously or with the user's credentials,
and retry with `Authorization: Bearer <token>`.

Where credentials may go: Basic credentials only to the registry itself (the Authorization
header of its requests); to a token realm only over https, or plain http to a host the operator
listed in `insecure_registries`. The realm is named by the registry, so it is refused otherwise,
asked nothing (with or without credentials), and never followed through a redirect. Credentials
travel in the Authorization header, never in a query string, and no message shows the password.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass

import httpx

_CHALLENGE_PARAM_RE = re.compile(r'(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')


class RegistryAuthError(Exception):
    pass


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """`Bearer realm="x",service="y"` -> ("bearer", {"realm": "x", "service": "y"})."""
    scheme, _, rest = header.strip().partition(" ")
    params = {
        m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3)
        for m in _CHALLENGE_PARAM_RE.finditer(rest)
    }
    return scheme.lower(), params


class RegistryAuth:
    """Holds the Authorization header for one repository and renews it on a 401."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        registry: str,
        repository: str,
        credentials: Credentials | None,
        insecure_registries: frozenset[str] = frozenset(),
    ) -> None:
        self._http = http
        self._registry = registry
        self._repository = repository
        self._credentials = credentials
        self._insecure = insecure_registries
        self.header: str | None = None

    async def answer_challenge(self, response: httpx.Response) -> None:
        challenge = response.headers.get("www-authenticate", "")
        scheme, params = parse_challenge(challenge)
        if scheme == "basic":
            if self._credentials is None:
                raise RegistryAuthError(
                    f"registry {self._registry} requires a username and password "
                    "(--registry-username/--registry-password)"
                )
            pair = f"{self._credentials.username}:{self._credentials.password}".encode()
            self.header = "Basic " + base64.b64encode(pair).decode()
            return
        if scheme != "bearer" or "realm" not in params:
            raise RegistryAuthError(
                f"registry {self._registry} answered 401 with an unsupported challenge {challenge!r}"
            )
        self.header = "Bearer " + await self._fetch_token(params)

    def _checked_realm(self, realm: str) -> httpx.URL:
        try:
            url = httpx.URL(realm)
        except httpx.InvalidURL as exc:
            raise RegistryAuthError(f"registry {self._registry} named an invalid token service") from exc
        plain_allowed = url.scheme == "http" and url.netloc.decode() in self._insecure
        if (url.scheme != "https" and not plain_allowed) or url.userinfo or not url.host:
            raise RegistryAuthError(
                f"registry {self._registry} sends clients to the token service {url.copy_with(query=None)}: "
                "refused, a token service must use https (plain http only for hosts in insecure_registries)"
            )
        return url

    async def _fetch_token(self, params: dict[str, str]) -> str:
        realm = self._checked_realm(params["realm"])
        shown = realm.copy_with(query=None)
        query = {"scope": params.get("scope") or f"repository:{self._repository}:pull"}
        if "service" in params:
            query["service"] = params["service"]
        auth = (self._credentials.username, self._credentials.password) if self._credentials else None
        try:
            response = await self._http.get(realm, params=query, auth=auth, follow_redirects=False)
        except httpx.HTTPError as exc:
            raise RegistryAuthError(f"cannot reach the token service {shown}: {exc}") from exc
        if response.status_code in (401, 403):
            who = f"user {self._credentials.username!r}" if self._credentials else "anonymous access"
            raise RegistryAuthError(
                f"registry {self._registry} refused {who}: the token service answered "
                f"{response.status_code}" + (" (wrong username or password?)" if self._credentials else "")
            )
        if response.status_code != 200:
            raise RegistryAuthError(
                f"token service {shown} answered {response.status_code}: {response.text[:200]}"
            )
        try:
            body = response.json()
            return str(body.get("token") or body["access_token"])
        except (ValueError, KeyError) as exc:
            raise RegistryAuthError(f"token service {shown} returned no token") from exc
