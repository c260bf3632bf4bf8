"""The `desktop` template (e2b-desktop SDK): the `browser` recipe + Xvfb, Xfce, x11vnc and noVNC.

Same stages as default.py with this recipe (image/rootfs-desktop/packages.txt); the SDK itself
starts Xvfb, startxfce4, x11vnc and noVNC in the sandbox (e2b_desktop.Sandbox.create / stream.start),
launches applications with gtk-launch and opens files and URLs with xdg-open. The assembly adds
image/rootfs-desktop/chromium-flags as /etc/chromium.d/cube (Chromium started from the desktop).
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
from appliance.templates.guest_setup import install_file

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


# Files of image/rootfs-desktop/ installed into the image: guest path → (source, mode).
GUEST_FILES = {
    "/etc/chromium.d/cube": (RECIPE_DIR / "chromium-flags", 0o644),
    "/etc/xdg/mimeapps.list": (RECIPE_DIR / "mimeapps.list", 0o644),
}


def assembly_digest() -> str:
    """The default template's assembly (agent and init: the SDK starts the desktop itself) + this
    module and the files it installs."""
    digest = hashlib.sha256(default.assembly_digest().encode())
    for path in [Path(__file__), *(source for source, _mode in GUEST_FILES.values())]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


async def assemble(tree: Path) -> None:
    """The default assembly (agent, init) and the desktop's files."""
    default.inject_agent(tree)
    for guest_path, (source, mode) in GUEST_FILES.items():
        install_file(tree, guest_path, source, mode)
    await default.finish_assembly(tree)


def manifest(directory: Path, source: str) -> TemplateManifest:
    base = default.default_manifest(directory, source)
    return replace(base, template_id=TEMPLATE_ID, aliases=ALIASES, memory_mb=MEMORY_MB)


def desktop_recipe_template() -> default.RecipeTemplate:
    return default.RecipeTemplate(TEMPLATE_ID, ALIASES, load_recipe(), assembly_digest(), assemble, manifest)


async def build_desktop_template(config: Config, progress: Progress | None = None) -> TemplateManifest:
    """Build (or find cached) the `desktop` template; returns its published manifest."""
    return await default.build_recipe_template(config, desktop_recipe_template(), progress)
