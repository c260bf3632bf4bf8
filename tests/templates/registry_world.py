"""Test images built from file lists, a real registry on loopback, and a token server.

- `OciLayout` writes an OCI image layout (layers as tar from `Entry` lists,
  gzip/zstd/plain, configs, manifests, indexes) that skopeo pushes as is.
- `start_registry` runs Debian's docker-registry on 127.0.0.1:<free port> with
  a private storage dir, optionally with token auth against `TokenServer`,
  a tiny JWT issuer (ES256, x5c) that grants pull/push to one user.
"""

from __future__ import annotations

import base64
import datetime
import gzip
import hashlib
import io
import json
import os
import subprocess
import tarfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID
from freeports import free_port

from appliance.templates.jobs import BuildJob, JobStore
from appliance.templates.layer_cache import LayerCache
from appliance.templates.pull import pull_image
from appliance.templates.registry_auth import Credentials

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_TYPES = {
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
    "none": "application/vnd.oci.image.layer.v1.tar",
}
USER = "alice"
PASSWORD = "s3cret"


@dataclass
class Entry:
    path: str
    kind: str = "file"  # file dir symlink hardlink chr fifo
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    link: str = ""
    xattrs: dict[str, bytes] = field(default_factory=dict)
    devmajor: int = 0
    devminor: int = 0


def layer_tar(entries: list[Entry]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in entries:
            info = tarfile.TarInfo(entry.path)
            info.mode, info.uid, info.gid, info.mtime = entry.mode, entry.uid, entry.gid, 1_700_000_000
            info.type = {
                "file": tarfile.REGTYPE,
                "dir": tarfile.DIRTYPE,
                "symlink": tarfile.SYMTYPE,
                "hardlink": tarfile.LNKTYPE,
                "chr": tarfile.CHRTYPE,
                "fifo": tarfile.FIFOTYPE,
            }[entry.kind]
            info.linkname = entry.link
            info.devmajor, info.devminor = entry.devmajor, entry.devminor
            info.pax_headers = {
                f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape") for k, v in entry.xattrs.items()
            }
            info.size = len(entry.data) if entry.kind == "file" else 0
            tar.addfile(info, io.BytesIO(entry.data) if entry.kind == "file" else None)
    return out.getvalue()


def compress(data: bytes, compression: str) -> bytes:
    if compression == "gzip":
        return gzip.compress(data, mtime=0)
    if compression == "zstd":
        return subprocess.run(["zstd", "-q", "-c"], input=data, capture_output=True, check=True).stdout
    return data


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class OciLayout:
    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
        self.refs: list[dict[str, object]] = []

    def blob(self, data: bytes, media_type: str) -> dict[str, object]:
        digest = sha256(data)
        (self.root / "blobs" / "sha256" / digest.split(":")[1]).write_bytes(data)
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    def image(
        self,
        layers: list[tuple[list[Entry], str]],
        architecture: str = "amd64",
        run_config: dict[str, object] | None = None,
    ) -> dict[str, object]:
        """A manifest descriptor (with platform) for layers given as (entries, compression)."""
        descriptors, diff_ids = [], []
        for entries, compression in layers:
            tar = layer_tar(entries)
            diff_ids.append(sha256(tar))
            descriptors.append(self.blob(compress(tar, compression), LAYER_TYPES[compression]))
        config = {
            "architecture": architecture,
            "os": "linux",
            "config": run_config or {},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }
        config_descriptor = self.blob(json.dumps(config).encode(), OCI_CONFIG)
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": config_descriptor,
            "layers": descriptors,
        }
        descriptor = self.blob(json.dumps(manifest).encode(), OCI_MANIFEST)
        descriptor["platform"] = {"os": "linux", "architecture": architecture}
        return descriptor

    def index(self, manifests: list[dict[str, object]]) -> dict[str, object]:
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}
        return self.blob(json.dumps(index).encode(), OCI_INDEX)

    def tag(self, descriptor: dict[str, object], ref: str) -> None:
        entry = {k: v for k, v in descriptor.items() if k != "platform"}
        entry["annotations"] = {"org.opencontainers.image.ref.name": ref}
        self.refs.append(entry)
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": self.refs}
        (self.root / "index.json").write_text(json.dumps(index))


def skopeo_copy(source: str, dest: str, creds: str | None = None, all_images: bool = False) -> None:
    command = ["skopeo", "--insecure-policy", "copy", "--quiet", "--dest-tls-verify=false"]
    if creds:
        command += ["--dest-creds", creds]
    if all_images:
        command.append("--all")
    subprocess.run([*command, source, dest], check=True, capture_output=True, timeout=120)


class QuietHandler(BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:  # http.server's naming
        pass


class LoopbackHttpServer:
    """An http.server on 127.0.0.1:<free port> (or another loopback address), served by a thread
    until close()."""

    def __init__(self, handler: type[BaseHTTPRequestHandler], address: str = "127.0.0.1") -> None:
        self.server = ThreadingHTTPServer((address, 0), handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def host(self) -> str:
        return f"{self.server.server_address[0]}:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


Respond = Callable[[BaseHTTPRequestHandler], None]


class RecordingServer:
    """A loopback HTTP server that answers every GET with `respond` and records its path and
    Authorization header."""

    def __init__(self, respond: Respond, address: str = "127.0.0.1") -> None:
        self.requests: list[tuple[str, str | None]] = []
        outer = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:  # http.server's naming
                outer.requests.append((self.path, self.headers.get("Authorization")))
                respond(self)

        self.http = LoopbackHttpServer(Handler, address)

    @property
    def paths(self) -> list[str]:
        return [path for path, _ in self.requests]

    @property
    def url(self) -> str:
        return f"http://{self.http.host}"

    def close(self) -> None:
        self.http.close()


def send(status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> Respond:
    """A `respond` for RecordingServer: always the same answer."""

    def respond(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(status)
        for name, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(body)

    return respond


class FakeRegistry(RecordingServer):
    """A read-only registry (v2 manifests and blobs) served from an OCI layout, for what a real
    registry would not do: ask for credentials with any challenge (and accept only the
    Authorization header `accept`, or none), redirect blob downloads to another server, serve other
    bytes than a blob's."""

    def __init__(
        self,
        layout: Path,
        *,
        challenge: str | None = None,
        accept: str | None = None,
        blob_location: str | None = None,
        blob_bodies: dict[str, bytes] | None = None,
    ) -> None:
        self.layout = layout

        def respond(handler: BaseHTTPRequestHandler) -> None:
            authorization = handler.headers.get("Authorization")
            if challenge is not None and (accept is None or authorization != accept):
                send(401, headers={"WWW-Authenticate": challenge})(handler)
                return
            kind, ref = urlparse(handler.path).path.split("/")[-2:]
            if kind == "blobs" and blob_location is not None:
                send(307, headers={"Location": f"{blob_location}{handler.path}"})(handler)
                return
            data = (blob_bodies or {}).get(ref) or self.document(ref if kind == "blobs" else self.digest(ref))
            if data is None:
                send(404)(handler)
                return
            media_type = json.loads(data).get("mediaType", "") if kind == "manifests" else ""
            send(200, data, {"Content-Type": media_type or "application/octet-stream"})(handler)

        super().__init__(respond)

    def digest(self, reference: str) -> str:
        if reference.startswith("sha256:"):
            return reference
        index = json.loads((self.layout / "index.json").read_text())
        for entry in index["manifests"]:
            if entry.get("annotations", {}).get("org.opencontainers.image.ref.name") == reference:
                return str(entry["digest"])
        return ""

    def document(self, digest: str) -> bytes | None:
        path = self.layout / "blobs" / "sha256" / digest.removeprefix("sha256:")
        return path.read_bytes() if digest and path.is_file() else None

    @property
    def host(self) -> str:
        return self.http.host


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer:
    """GET /token?service=..&scope=..: a JWT for USER/PASSWORD; anonymous callers get no access."""

    issuer = "cube-test-issuer"
    service = "cube-test-registry"

    def __init__(self, directory: Path) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.issuer)])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(self.key, hashes.SHA256())
        )
        self.cert_path = directory / "token-ca.pem"
        self.cert_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        self.requests: list[tuple[str | None, list[str]]] = []
        self.paths: list[str] = []  # as asked for, query string and all
        outer = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:
                query = parse_qs(urlparse(self.path).query)
                scopes = query.get("scope", [])
                user = outer.authenticate(self.headers.get("Authorization"))
                outer.requests.append((user, scopes))
                outer.paths.append(self.path)
                if user is False:
                    self.send_response(401)
                    self.end_headers()
                    return
                body = json.dumps({"token": outer.token(user or "", scopes)}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.http = LoopbackHttpServer(Handler)

    @property
    def realm(self) -> str:
        return f"http://{self.http.host}/token"

    def authenticate(self, header: str | None) -> str | bool | None:
        """The user name, None for anonymous, False for wrong credentials."""
        if not header:
            return None
        user, _, password = base64.b64decode(header.split(" ", 1)[1]).decode().partition(":")
        return user if (user, password) == (USER, PASSWORD) else False

    def token(self, user: str, scopes: list[str]) -> str:
        access = []
        for scope in scopes if user else []:
            kind, name, actions = scope.split(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": user,
            "aud": self.service,
            "exp": now + 600,
            "nbf": now - 10,
            "iat": now,
            "jti": os.urandom(8).hex(),
            "access": access,
        }
        der = self.cert.public_bytes(serialization.Encoding.DER)
        header = {"typ": "JWT", "alg": "ES256", "x5c": [base64.b64encode(der).decode()]}
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        r, s = decode_dss_signature(self.key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
        return f"{signing_input}.{_b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"

    def close(self) -> None:
        self.http.close()


class BasicAuthProxy:
    """A registry front that wants HTTP Basic credentials (like an htpasswd-protected registry) and
    forwards authorised GETs to a plain loopback registry."""

    def __init__(self, upstream: str) -> None:
        expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()

        class Handler(QuietHandler):
            def do_GET(self) -> None:  # http.server's naming
                if self.headers.get("Authorization") != expected:
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Basic realm="cube-test"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                headers = {"Accept": self.headers.get("Accept", "*/*")}
                if self.headers.get("Range"):
                    headers["Range"] = self.headers["Range"]
                answer = httpx.get(f"http://{upstream}{self.path}", headers=headers, follow_redirects=True)
                self.send_response(answer.status_code)
                for name in ("Content-Type", "Docker-Content-Digest", "Content-Range"):
                    if name in answer.headers:
                        self.send_header(name, answer.headers[name])
                self.send_header("Content-Length", str(len(answer.content)))
                self.end_headers()
                self.wfile.write(answer.content)

        self.http = LoopbackHttpServer(Handler)

    @property
    def host(self) -> str:
        return self.http.host

    def close(self) -> None:
        self.http.close()


@dataclass
class Registry:
    host: str  # 127.0.0.1:port
    storage: Path
    process: subprocess.Popen[bytes]

    def blob_data_path(self, digest: str) -> Path:
        hex_digest = digest.split(":")[1]
        return self.storage / "docker/registry/v2/blobs/sha256" / hex_digest[:2] / hex_digest / "data"

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_registry(directory: Path, token: TokenServer | None = None) -> Registry:
    port = free_port()
    storage = directory / "storage"
    storage.mkdir(parents=True)
    auth = ""
    if token is not None:
        auth = (
            f"auth:\n  token:\n    realm: {token.realm}\n    service: {token.service}\n"
            f"    issuer: {token.issuer}\n    rootcertbundle: {token.cert_path}\n"
        )
    config = directory / "registry.yml"
    config.write_text(
        "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {storage}\n"
        f"http:\n  addr: 127.0.0.1:{port}\n  secret: cube-test\n{auth}"
    )
    process = subprocess.Popen(
        ["docker-registry", "serve", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    registry = Registry(f"127.0.0.1:{port}", storage, process)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"docker-registry exited: {process.stderr.read().decode() if process.stderr else ''}"
            )
        try:
            httpx.get(f"http://{registry.host}/v2/", timeout=1.0)
            return registry
        except httpx.HTTPError:
            time.sleep(0.1)
    registry.stop()
    raise RuntimeError("docker-registry did not start listening")


# The image every pull test looks at: three layers (gzip, zstd, gzip) with a
# whiteout, an opaque directory, owners, modes, xattrs, hardlinks, symlinks,
# a device node, a fifo, a directory replaced by a file and a symlink that
# tries to point a later write outside the rootfs.
MULTI_LAYERS = [
    (
        [
            Entry("etc", "dir", mode=0o755),
            Entry("etc/passwd", data=b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n"),
            Entry("etc/group", data=b"root:x:0:\napp:x:1000:\n"),
            Entry("usr/bin", "dir", mode=0o755),
            Entry("usr/bin/tool", data=b"#!/bin/sh\necho tool\n", mode=0o4755),
            Entry("data", "dir", mode=0o755),
            Entry("data/keep.txt", data=b"keep v1"),
            Entry("data/gone.txt", data=b"gone"),
            Entry("data/original", data=b"same inode"),
            Entry("data/link", "hardlink", link="data/original"),
            Entry("data/sym", "symlink", link="keep.txt"),
            Entry("data/xattr.txt", data=b"x", xattrs={"user.cube": b"\xff\x00binary"}),
            Entry("data/pipe", "fifo", mode=0o600),
            Entry("dev", "dir", mode=0o755),
            Entry("dev/cube0", "chr", mode=0o666, devmajor=1, devminor=3),
            Entry("opaque", "dir", mode=0o755),
            Entry("opaque/lower.txt", data=b"lower"),
            Entry("opaque/sub", "dir", mode=0o755),
            Entry("opaque/sub/deep.txt", data=b"deep"),
            Entry("swap", "dir", mode=0o755),
            Entry("swap/inner.txt", data=b"inner"),
            Entry("home/app", "dir", mode=0o750, uid=1000, gid=1000),
            Entry("home/app/owned.txt", data=b"mine", mode=0o600, uid=1000, gid=1000),
        ],
        "gzip",
    ),
    (
        [
            Entry("data/.wh.gone.txt"),
            Entry("data/keep.txt", data=b"keep v2"),
            Entry("opaque/.wh..wh..opq"),
            Entry("opaque/upper.txt", data=b"upper"),
            Entry("swap", data=b"now a file"),
        ],
        "zstd",
    ),
    (
        [
            Entry("escape", "symlink", link="../../../../../tmp/cube-escape-test"),
            Entry("escape/pwned", data=b"must stay inside the rootfs"),
        ],
        "gzip",
    ),
]
MULTI_CONFIG = {
    "Entrypoint": ["/usr/bin/tool"],
    "Cmd": ["--serve"],
    "Env": ["PATH=/usr/bin:/bin", "GREETING=hello world"],
    "WorkingDir": "/data",
    "User": "app",
    "ExposedPorts": {"8080/tcp": {}},
}


@dataclass
class Registries:
    plain: Registry
    token: Registry
    token_server: TokenServer

    @property
    def plain_http_hosts(self) -> str:
        """The registries and token service, all plain HTTP on loopback, as the operator must list
        them in `insecure_registries`."""
        return ",".join((self.plain.host, self.token.host, self.token_server.http.host))


@dataclass
class Images:
    layout: Path  # the OCI layout every image was pushed from; refs as the names below, and multi-gzip
    multi: str
    multiarch: str
    arm64: str
    arm64_list: str
    corrupt: str
    private: str
    multi_layer_digests: list[str]


@dataclass(frozen=True)
class Puller:
    """Pulls as a template build does, with one test's job store, job, layer cache and
    insecure (plain-HTTP) registries: the `puller` fixture (tests/templates/conftest.py)."""

    store: JobStore
    job: BuildJob
    scratch: Path
    cache: LayerCache
    insecure: frozenset[str]

    async def __call__(
        self,
        image: str,
        credentials: Credentials | None = None,
        *,
        into: str = "",
        job: BuildJob | None = None,
        insecure: frozenset[str] | None = None,
    ) -> Path:
        """`image` pulled and unpacked into `scratch/<into>/rootfs` (scratch/rootfs without `into`);
        `job` and `insecure` replace the fixture's."""
        scratch = self.scratch / into
        rootfs = scratch / "rootfs"
        rootfs.mkdir(parents=True, exist_ok=True)
        chosen = self.insecure if insecure is None else insecure
        await pull_image(
            self.store, job or self.job, image, rootfs, scratch / "work", self.cache, credentials, chosen
        )
        return rootfs
