"""The `browser` template: the default template's recipe + Chromium, fonts and Playwright for Python.

Same two cached stages as default.py (its functions, with this recipe):
1. mmdebstrap of the default recipe + `image/rootfs-browser/packages.txt` + pip `playwright`
   (no browser download: it drives Debian's /usr/bin/chromium) → `<cache_dir>/rootfs/<hash>.tar`,
   a recipe hash of its own (the default template's stays what it was).
2. the default assembly (guest agent, init) + `image/rootfs-browser/`'s start script and CDP
   front → `<templates_dir>/browser/rootfs.ext4`.

A sandbox of it starts Chromium at boot (the template's start command) with remote debugging on
127.0.0.1:9223 and the CDP front (cdp_front.py) on 0.0.0.0:9222, so clients attach with
`connect_over_cdp(sandbox.get_host(9222))`. Chromium runs with `--no-sandbox`: the guest VM is
the sandbox (Chromium's own needs user namespaces / a setuid helper the guest does not offer).
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import trio

from appliance.config import IMAGE_DIR, Config
from appliance.progress import Progress
from appliance.records import TemplateManifest
from appliance.runtime.base import CODE_INTERPRETER_PORT, ENVD_PORT
from appliance.templates import default
from appliance.templates.default import Recipe, package_list, pip_install_hooks
from appliance.templates.guest_setup import install_file, prepare_rootfs

RECIPE_DIR = IMAGE_DIR / "rootfs-browser"
TEMPLATE_ID = "browser"
ALIASES = ("browser-v1",)
# Chromium's renderers want far more than a Python kernel.
MEMORY_MB = 1024
CPU_COUNT = 1  # (UML guests have one)
CDP_PORT = 9222  # the CDP front, on every address of the guest
CHROMIUM_DEBUG_PORT = 9223  # Chromium's own, on 127.0.0.1 only
# The same as the host venv's (tests drive it from both sides); pip resolves its two dependencies.
PLAYWRIGHT = "playwright==1.65.3"
BROWSER_HOOKS = (
    *pip_install_hooks(PLAYWRIGHT),
    'chroot "$1" python3 -c "import playwright.sync_api"',
    'rm -rf "$1"/var/cache/apt/archives/*.deb "$1"/var/lib/apt/lists/*',
)
# Where the start script and the CDP front go in the guest.
GUEST_DIR = "/opt/cube/browser"
ENVS = {
    # Playwright inside uses Debian's Chromium: `executable_path="/usr/bin/chromium"`.
    "PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD": "1",
    "CHROME_PATH": "/usr/bin/chromium",
}


def load_recipe() -> Recipe:
    base = default.load_recipe()
    packages = sorted(set(base.packages) | set(package_list(RECIPE_DIR / "packages.txt")))
    return Recipe(base.suite, base.mirror, tuple(packages), base.hooks + BROWSER_HOOKS, base.essential_hooks)


def guest_files() -> dict[str, tuple[Path, int]]:
    """Files of image/rootfs-browser/ installed into the image: guest path → (source, mode)."""
    return {
        f"{GUEST_DIR}/start": (RECIPE_DIR / "start", 0o755),
        f"{GUEST_DIR}/cdp_front.py": (RECIPE_DIR / "cdp_front.py", 0o644),
    }


# The template's start command (run as its user by the guest init) and its readiness: the CDP
# front answers /json/version only once Chromium does (guest-side; the host probes it).
START_CMD = (f"{GUEST_DIR}/start",)
PROBE_PATH = "/json/version"


def assembly_digest() -> str:
    """The default template's assembly + this module and the files it installs."""
    digest = hashlib.sha256(default.assembly_digest().encode())
    for path in [Path(__file__), *(source for source, _mode in guest_files().values())]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


async def assemble(tree: Path) -> None:
    """The agent with the init for templates with a start command (the default's init starts none),
    the start script, the CDP front; then what every recipe's image gets."""
    await trio.to_thread.run_sync(
        prepare_rootfs, tree, START_CMD, ENVS, f"/home/{default.USER}", default.USER, ()
    )
    for guest_path, (source, mode) in guest_files().items():
        install_file(tree, guest_path, source, mode)
    await default.finish_assembly(tree)


def manifest(directory: Path, source: str) -> TemplateManifest:
    return replace(
        default.default_manifest(directory, source),
        template_id=TEMPLATE_ID,
        aliases=ALIASES,
        memory_mb=MEMORY_MB,
        cpu_count=CPU_COUNT,
        envs=dict(ENVS),
        start_cmd=START_CMD,
        expose_ports=(ENVD_PORT, CODE_INTERPRETER_PORT, CDP_PORT),
        probe_port=CDP_PORT,
        probe_path=PROBE_PATH,
    )


def browser_recipe_template() -> default.RecipeTemplate:
    return default.RecipeTemplate(TEMPLATE_ID, ALIASES, load_recipe(), assembly_digest(), assemble, manifest)


async def build_browser_template(config: Config, progress: Progress | None = None) -> TemplateManifest:
    """Build (or find cached) the `browser` template; returns its published manifest."""
    return await default.build_recipe_template(config, browser_recipe_template(), progress)
