"""What the control-plane routes work with, reached from any of them through `services()`."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from secrets import token_bytes

import trio
from quart import current_app

from appliance.api.auth import Authenticator
from appliance.cluster.node import ClusterNode
from appliance.config import Config
from appliance.cubelet.cubelet import Cubelet
from appliance.master.secrets import SecretStore
from appliance.master.templates import TemplateRegistry
from appliance.master.volumes import VolumeStore
from appliance.records import Store
from appliance.templates.builds import TemplateBuilds

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
    # The template build service, where it runs (always in `cube serve`; None in apps without one).
    builds: TemplateBuilds | None = None
    # This node's part in a cluster (None: a single node); set once it watches the cluster.
    cluster: ClusterNode | None = None
    # Signs the upload links of the E2B SDKs' template files (api/sdk_templates.py); one per run.
    upload_key: bytes = field(default_factory=lambda: token_bytes(32), repr=False)
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
