"""The default template `code-interpreter` (aliases `code-interpreter-v1`, `base`) from a Debian recipe.

Two cached stages:
1. mmdebstrap (bookworm minbase + `image/rootfs/packages.txt` + the guest
   agent's `appliance/guest/DEBIAN_PACKAGES`, user `user`, pip allowed for
   users) → `<cache_dir>/rootfs/<recipe hash>.tar`. Minutes; network.
2. that tarball + the guest agent + `image/rootfs/cube-init` → an ext4 image
   (`mkfs.ext4 -d`, no loop mounts) in `<templates_dir>/code-interpreter/`,
   rebuilt when the recipe, the agent, the init or these steps change (the
   manifest's `source` records the hashes). A minute or two.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import trio

import appliance
from appliance.config import IMAGE_DIR, Config
from appliance.progress import Progress
from appliance.records import TemplateManifest
from appliance.templates import guest_setup
from appliance.templates.catalog import BUILDING_MARKER, load_aliases, publish_template
from appliance.templates.ext4 import build_ext4
from appliance.templates.guest_setup import (
    AGENT_DIR,
    INIT_PATH,
    compile_in_image_argv,
    copy_agent,
    install_file,
)
from appliance.templates.jobs import utc_now

RECIPE_DIR = IMAGE_DIR / "rootfs"
AGENT_PACKAGES = Path(appliance.__file__).parent / "guest" / "DEBIAN_PACKAGES"
TEMPLATE_ID = "code-interpreter"
ALIASES = ("code-interpreter-v1", "base")
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
# A Python kernel with numpy/pandas/matplotlib imported stays well under this;
# the rest is page cache for the guest.
MEMORY_MB = 512
CPU_COUNT = 1
WRITABLE_LAYER_MB = 2048
USER = "user"
USER_UID = 1000
# CAs the host's administrator added (e.g. for a TLS-inspecting egress proxy):
# sandboxes behind the same egress need them for pip, npm and curl to work.
HOST_CA_DIR = Path("/usr/local/share/ca-certificates")


# What Debian does not package, from PyPI (pinned; their dependencies are Debian's, in packages.txt).
PYPI_PACKAGES = ("bash_kernel==0.10.0", "bokeh==3.1.1")
# Imported once at build: a recipe whose Python stack does not import fails here, not in a sandbox.
IMPORT_CHECK = "import bash_kernel.kernel, bokeh.plotting, docx, openpyxl, plotly, scipy, seaborn, sklearn"
# Text in CJK scripts falls back to Noto Sans CJK: matplotlib (>= 3.6) falls back glyph by glyph
# from one family of `font.family` to the next (not within the font.sans-serif list).
MATPLOTLIB_FONTS = "font.family: sans-serif, Noto Sans CJK JP"

# Run by mmdebstrap after the essential packages, before the rest (`$1` is the root).
ESSENTIAL_HOOKS = (
    # Without documentation (dpkg path-exclude) man1 does not exist, and the JDK's
    # update-alternatives fails on the man page links it makes there.
    'mkdir -p "$1/usr/share/man/man1"',
)


def pip_install_hooks(*arguments: str) -> tuple[str, ...]:
    """Customize hooks running `pip install --no-cache-dir ARGUMENTS` in the new root."""
    return (
        # pip in the root with the build host's CAs (an egress proxy's included), removed after; the
        # host's own CA and pip settings in the environment name host paths, so they are overridden.
        'cp /etc/ssl/certs/ca-certificates.crt "$1/tmp/cube-build-ca.crt"',
        'chroot "$1" env PIP_CERT=/tmp/cube-build-ca.crt REQUESTS_CA_BUNDLE=/tmp/cube-build-ca.crt '
        "SSL_CERT_FILE=/tmp/cube-build-ca.crt PIP_FIND_LINKS= PIP_DISABLE_PIP_VERSION_CHECK=1 "
        "python3 -m pip install --no-cache-dir " + " ".join(arguments),
        'rm -f "$1/tmp/cube-build-ca.crt"',
    )


# Run inside the new root by mmdebstrap (`$1` is the root). Part of the recipe hash.
CUSTOMIZE_HOOKS = (
    f'chroot "$1" useradd --create-home --uid {USER_UID} --user-group --shell /bin/bash {USER}',
    # As in E2B's template, the user may sudo without a password: the sandbox is the boundary.
    f'printf "{USER} ALL=(ALL:ALL) NOPASSWD: ALL\\n" > "$1/etc/sudoers.d/{USER}"',
    f'chmod 0440 "$1/etc/sudoers.d/{USER}"',
    # pip may install for users (into ~/.local) and for root: a sandbox is disposable.
    'rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED',
    *pip_install_hooks("--no-deps", *PYPI_PACKAGES),
    f'chroot "$1" python3 -c "{IMPORT_CHECK}"',
    f'printf "\\n# Cube: CJK text falls back to Noto Sans CJK\\n{MATPLOTLIB_FONTS}\\n" '
    '>> "$1/etc/matplotlibrc"',
    # site.py adds the user site directory only if it exists when Python starts: a
    # kernel started before `pip install --user` must still import what it installs.
    f'chroot "$1" runuser -u {USER} -- env HOME=/home/{USER} python3 -c '
    '"import os, site; os.makedirs(site.getusersitepackages(), exist_ok=True)"',
    # matplotlib's font list, made once here rather than at each sandbox's first plot (a scan of
    # every font, CJK ones included: seconds under UML).
    f'chroot "$1" runuser -u {USER} -- env HOME=/home/{USER} python3 -c "import matplotlib.font_manager"',
    'chroot "$1" env HOME=/root python3 -c "import matplotlib.font_manager"',
    'printf "sandbox\\n" > "$1/etc/hostname"',
    'printf "127.0.0.1 localhost sandbox\\n::1 localhost\\n" > "$1/etc/hosts"',
    'rm -rf "$1"/var/cache/apt/archives/*.deb "$1"/var/lib/apt/lists/*',
)


@dataclass(frozen=True)
class Recipe:
    suite: str
    mirror: str
    packages: tuple[str, ...]
    hooks: tuple[str, ...]
    essential_hooks: tuple[str, ...] = ()

    def digest(self) -> str:
        parts = [self.suite, self.mirror, *self.packages, "--", *self.hooks]
        if self.essential_hooks:  # (a recipe without them keeps the digest it had)
            parts += ["-- essential", *self.essential_hooks]
        text = "\n".join(parts)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def package_list(path: Path) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def load_recipe() -> Recipe:
    if not AGENT_PACKAGES.is_file():
        raise RuntimeError(f"{AGENT_PACKAGES} is missing: the guest agent's Debian packages are unknown")
    packages = sorted(set(package_list(RECIPE_DIR / "packages.txt") + package_list(AGENT_PACKAGES)))
    return Recipe(SUITE, MIRROR, tuple(packages), CUSTOMIZE_HOOKS, ESSENTIAL_HOOKS)


def assembly_digest() -> str:
    """Hash of what stage 2 depends on: the agent package, the init and this module's steps."""
    package = Path(appliance.__file__).parent
    labelled = {"init": RECIPE_DIR / "cube-init", "builder": Path(__file__)}
    labelled["agent-copy"] = Path(guest_setup.__file__)
    labelled |= {f"ca/{path.name}": path for path in host_cas()}
    for path in [package / "__init__.py", *(package / "guest").rglob("*")]:
        if path.is_file() and "__pycache__" not in path.parts:
            labelled[str(path.relative_to(package))] = path
    digest = hashlib.sha256()
    for label in sorted(labelled):
        digest.update(label.encode() + b"\0" + labelled[label].read_bytes() + b"\0")
    return digest.hexdigest()[:16]


async def bootstrap_tarball(recipe: Recipe, cache_dir: Path, progress: Progress) -> Path:
    """The recipe's root filesystem as a tarball, from the cache or a fresh mmdebstrap run."""
    tarball = cache_dir / "rootfs" / f"{recipe.digest()}.tar"
    if tarball.exists():
        progress("bootstrap cached", 1.0)
        return tarball
    tarball.parent.mkdir(parents=True, exist_ok=True)
    partial = tarball.with_suffix(".tar.partial")
    argv = [
        "nice", "-n", "10", "mmdebstrap", "--variant=minbase", "--mode=root", "--format=tar",
        "--aptopt=APT::Install-Recommends \"false\"",
        # Documentation is dead weight in every sandbox's image.
        "--dpkgopt=path-exclude=/usr/share/doc/*", "--dpkgopt=path-include=/usr/share/doc/*/copyright",
        "--dpkgopt=path-exclude=/usr/share/man/*", "--dpkgopt=path-exclude=/usr/share/locale/*",
        "--include=" + ",".join(recipe.packages),
        *(f"--essential-hook={hook}" for hook in recipe.essential_hooks),
        *(f"--customize-hook={hook}" for hook in recipe.hooks),
        recipe.suite, str(partial), recipe.mirror,
    ]  # fmt: skip
    log = tarball.with_suffix(".log")
    progress("bootstrapping Debian (mmdebstrap)", None)
    with log.open("wb") as sink:
        result = await trio.run_process(argv, stdout=sink, stderr=subprocess.STDOUT, check=False)
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"mmdebstrap failed ({result.returncode}); see {log}:\n{tail}")
    partial.rename(tarball)
    progress("bootstrapped", 1.0)
    return tarball


def host_cas() -> list[Path]:
    return sorted(HOST_CA_DIR.glob("*.crt")) if HOST_CA_DIR.is_dir() else []


async def add_host_cas(root: Path) -> None:
    """Trust the host's locally added CAs in the image too."""
    cas = host_cas()
    if not cas:
        return
    target = root / HOST_CA_DIR.relative_to("/")
    target.mkdir(parents=True, exist_ok=True)
    for path in cas:
        shutil.copy2(path, target / path.name)
    # Its ca-certificates-java hook runs dpkg's trigger, which imports the new CAs into Java's
    # cacerts with the JDK's keytool: that needs /proc (see run_in_image).
    await run_in_image(root, "update-ca-certificates")


async def run_in_image(root: Path, command: str) -> None:
    """`command` (a shell word list) chrooted into the image, with a /proc of its own: the JDK's
    launchers find libjli.so through /proc/self/exe, and fail without it. The mount lives in a
    mount namespace of its own and is gone with it."""
    script = f'mount -t proc proc "$1/proc" && exec chroot "$1" {command}'
    argv = ["unshare", "--mount", "--fork", "--propagation", "private", "sh", "-c", script, "sh", str(root)]
    await trio.run_process(argv, stdout=subprocess.DEVNULL)


def inject_agent(root: Path) -> None:
    """The guest agent (its dependencies are Debian packages of the recipe here) and the recipe's init."""
    copy_agent(root, dependencies=())
    install_file(root, INIT_PATH, RECIPE_DIR / "cube-init", 0o755)
    skip_id_in_login_profile(root)


# Debian's /etc/profile asks `id` for the uid: a fork and an exec in every login shell, and
# every E2B command is one (`/bin/bash -l -c`): ~25 ms of each under UML. Bash knows its
# effective uid ($EUID); other shells (dash, no EUID) still ask `id`. Same value, same PATH.
PROFILE_UID_TEST = '[ "$(id -u)" -eq 0 ]'
PROFILE_UID_TEST_FAST = '[ "${EUID:-$(id -u)}" -eq 0 ]'


def skip_id_in_login_profile(root: Path) -> None:
    profile = root / "etc/profile"
    if profile.is_file():
        text = profile.read_text()
        profile.write_text(text.replace(PROFILE_UID_TEST, PROFILE_UID_TEST_FAST))


async def compile_java_kernel(root: Path) -> None:
    """The agent's JavaKernel.java → classes beside it (java_kernel.py's CLASSES), by the image's JDK:
    Java contexts then start without the source launcher compiling it each time (~1 s, more in a guest)."""
    # A link into /etc/alternatives: whether it is there, not where it points (on the host).
    if not os.path.lexists(root / "usr/bin/javac"):
        return
    guest = f"{AGENT_DIR}/appliance/guest"
    await run_in_image(root, f"javac -d {guest}/java_kernel_classes {guest}/JavaKernel.java")


def default_manifest(directory: Path, source: str) -> TemplateManifest:
    return TemplateManifest(
        template_id=TEMPLATE_ID,
        directory=directory,
        aliases=ALIASES,
        memory_mb=MEMORY_MB,
        cpu_count=CPU_COUNT,
        writable_layer_mb=WRITABLE_LAYER_MB,
        workdir=f"/home/{USER}",
        user=USER,
        source=source,
        created_at=utc_now(),
    )


@dataclass(frozen=True)
class RecipeTemplate:
    """A template built from a Debian recipe (this one, browser.py's): what differs between them."""

    template_id: str
    aliases: tuple[str, ...]
    recipe: Recipe
    assembly: str  # the digest of what `assemble` puts into the image
    assemble: Callable[[Path], Awaitable[None]]  # agent, init... into the unpacked root
    manifest: Callable[[Path, str], TemplateManifest]  # (directory, source) → its manifest


async def assemble_default(tree: Path) -> None:
    inject_agent(tree)
    await finish_assembly(tree)


async def finish_assembly(tree: Path) -> None:
    """What every recipe's image gets after its agent: host CAs, agent and Java kernel compiled."""
    await add_host_cas(tree)
    await trio.run_process(compile_in_image_argv(tree), stdout=subprocess.DEVNULL)
    await compile_java_kernel(tree)


def default_recipe_template() -> RecipeTemplate:
    return RecipeTemplate(
        TEMPLATE_ID, ALIASES, load_recipe(), assembly_digest(), assemble_default, default_manifest
    )


async def build_default_template(config: Config, progress: Progress | None = None) -> TemplateManifest:
    """Build (or find cached) the default template; returns its published manifest."""
    return await build_recipe_template(config, default_recipe_template(), progress)


async def build_recipe_template(
    config: Config, spec: RecipeTemplate, progress: Progress | None = None
) -> TemplateManifest:
    """Build (or find cached) the template `spec`; returns its published manifest."""
    report = progress or (lambda phase, fraction: None)
    source = f"recipe:{spec.recipe.digest()}+assembly:{spec.assembly}"
    final = config.templates_dir / spec.template_id
    if (final / "template.json").is_file() and (final / "rootfs.ext4").is_file():
        existing = TemplateManifest.load(final)
        if existing.source == source:
            report("template cached", 1.0)
            _publish_aliases(config, existing, spec.aliases)
            return existing

    tarball = await bootstrap_tarball(spec.recipe, config.cache_dir, report)
    config.templates_dir.mkdir(parents=True, exist_ok=True)
    # Stage next to the final directory (same filesystem: the swap is a rename).
    staging = Path(tempfile.mkdtemp(prefix=f".{spec.template_id}.", dir=config.templates_dir))
    staging.chmod(0o755)  # like every template directory (mkdtemp makes it 0700)
    # Marked unfinished until the swap: a build killed outright (no `finally`) leaves a
    # directory that the service's start-up sweep (catalog.remove_unfinished) removes.
    (staging / BUILDING_MARKER).touch()
    try:
        tree = staging / "tree"
        tree.mkdir()
        report("unpacking root filesystem", None)
        # As root with numeric owners, device nodes and permissions, exactly as mmdebstrap made them.
        await trio.run_process(["tar", "-xpf", str(tarball), "--numeric-owner", "-C", str(tree)])
        await spec.assemble(tree)
        report("writing rootfs.ext4", None)
        manifest = spec.manifest(final, source)
        await build_ext4(tree, staging / "rootfs.ext4", manifest.writable_layer_mb << 20)
        await trio.to_thread.run_sync(shutil.rmtree, tree)
        # Running sandboxes keep the old image open; new ones use the new one.
        if final.exists():
            old = staging.with_name(staging.name + ".old")
            final.rename(old)
            (old / BUILDING_MARKER).touch()
            shutil.rmtree(old)
        (staging / BUILDING_MARKER).unlink()
        staging.rename(final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    manifest.save()
    _publish_aliases(config, manifest, spec.aliases)
    report("template ready", 1.0)
    return manifest


def _publish_aliases(config: Config, manifest: TemplateManifest, names: tuple[str, ...]) -> None:
    aliases = load_aliases(config)
    for alias in names:
        entry = aliases.get(alias)
        if entry is None or entry["template_id"] != manifest.template_id:
            publish_template(config, manifest, alias)
