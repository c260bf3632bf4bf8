"""A client signed in to a dashboard (tests/dashboard, tests/cluster)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import httpx


@contextmanager
def signed_in(url: str, credential: str) -> Iterator[httpx.Client]:
    """A client holding a dashboard session, and the page's CSRF token as `client.csrf`."""
    with httpx.Client(base_url=url, trust_env=False, timeout=30) as client:
        response = client.post("/dashboard/login", data={"credential": credential})
        assert response.status_code == 303, response.text
        page = client.get("/dashboard/")
        assert page.status_code == 200
        client.csrf = page.text.split('name="csrf-token" content="')[1].split('"')[0]  # type: ignore[attr-defined]
        yield client
