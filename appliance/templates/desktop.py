"""The `desktop` template (e2b-desktop SDK): the `browser` recipe + Xvfb, Xfce, x11vnc and noVNC.

Same stages as default.py with this recipe (image/rootfs-desktop/packages.txt); the SDK itself
starts Xvfb, startxfce4, x11vnc and noVNC in the sandbox (e2b_desktop.Sandbox.create / stream.start).
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

from appliance.config import IMAGE_DIR, Config
from appliance.progress import Progress
from appliance.records import TemplateManifest
from appliance.templates import browser, default
from appliance.templates.default import Recipe, package_list

RECIPE_DIR = IMAGE_DIR / "rootfs-desktop"
TEMPLATE_ID = "desktop"
ALIASES = ("desktop-v1",)
DESKTOP_HOOKS = (
    # Where the SDK runs noVNC from (`cd /opt/noVNC/utils && ./novnc_proxy ...`).
    'ln -s /usr/share/novnc "$1/opt/noVNC"',
)


def load_recipe() -> Recipe:
    base = browser.load_recipe()
    packages = sorted(set(base.packages) | set(package_list(RECIPE_DIR / "packages.txt")))
    return Recipe(base.suite, base.mirror, tuple(packages), base.hooks + DESKTOP_HOOKS, base.essential_hooks)


MEMORY_MB = 1024  # Xvfb, Xfce and a browser


def assembly_digest() -> str:
    """The default template's assembly (agent and init: the SDK starts the desktop itself) + this module."""
    digest = hashlib.sha256(default.assembly_digest().encode())
    digest.update(Path(__file__).read_bytes())
    return digest.hexdigest()[:16]


def manifest(directory: Path, source: str) -> TemplateManifest:
    base = default.default_manifest(directory, source)
    return replace(base, template_id=TEMPLATE_ID, aliases=ALIASES, memory_mb=MEMORY_MB)


def desktop_recipe_template() -> default.RecipeTemplate:
    return default.RecipeTemplate(
        TEMPLATE_ID, ALIASES, load_recipe(), assembly_digest(), default.assemble_default, manifest
    )


async def build_desktop_template(config: Config, progress: Progress | None = None) -> TemplateManifest:
    """Build (or find cached) the `desktop` template; returns its published manifest."""
    return await default.build_recipe_template(config, desktop_recipe_template(), progress)
