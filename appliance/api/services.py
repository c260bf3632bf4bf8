"""What the control-plane routes work with, reached from any of them through `services()`."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import trio
from quart import current_app

from appliance.api.auth import Authenticator
from appliance.config import Config
from appliance.cubelet.cubelet import Cubelet
from appliance.master.secrets import SecretStore
from appliance.master.templates import TemplateRegistry
from appliance.master.volumes import VolumeStore
from appliance.records import Store

SERVICES = "cube.services"  # its key in app.extensions


@dataclass
class Services:
    config: Config
    store: Store
    cubelet: Cubelet
    templates: TemplateRegistry
    auth: Authenticator
    secrets: SecretStore | None = None  # None: a service without secrets (a test's)
    volumes: VolumeStore | None = None  # None: a service without volumes (a test's)
    started_at: float = field(default_factory=time.time)
    # Creates under one (team, Idempotency-Key) wait for the first one's answer.
    creates_in_flight: dict[tuple[str, str], trio.Event] = field(default_factory=dict)
    # Creates per team not answered yet: they count against the team's sandbox cap.
    creating: Counter[str] = field(default_factory=Counter)


def services() -> Services:
    """The services of the app serving the current request."""
    found = current_app.extensions[SERVICES]
    assert isinstance(found, Services)
    return found
