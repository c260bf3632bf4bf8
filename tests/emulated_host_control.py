"""Runs inside the emulated host (tests only; handed over by fw_cfg, started by the kernel
command line's systemd.run): executes shell commands the test sends over a virtio-serial
port and answers with their exit status and output. One JSON object per line each way:
  -> {"id": 1, "command": "cube doctor --json", "timeout": 60}
  <- {"id": 1, "status": 0, "stdout": "...", "stderr": "..."}
The port is a unix socket on the outer machine in the test's private directory: no
network path leads here. Standard library only (Debian's python3 in the appliance).
"""

import json
import os
import subprocess
import sys
import time

PORT = "/dev/virtio-ports/cube.test"


def serve(port: str) -> None:
    fd = os.open(port, os.O_RDWR)  # a virtio port opens once
    pending = b""
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            time.sleep(0.1)  # nobody connected on the outer side yet
            continue
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            answer = json.dumps(run(json.loads(line))).encode() + b"\n"
            while answer:
                answer = answer[os.write(fd, answer) :]


def run(request: dict) -> dict:
    try:
        done = subprocess.run(
            ["/bin/sh", "-c", request["command"]],
            capture_output=True,
            timeout=request.get("timeout", 600),
            env={**os.environ, "PATH": "/opt/cube/venv/bin:/usr/sbin:/usr/bin:/sbin:/bin"},
        )
        status, stdout, stderr = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as exc:
        status, stdout, stderr = -1, exc.stdout or b"", (exc.stderr or b"") + b"\n(timed out)"
    return {
        "id": request["id"],
        "status": status,
        "stdout": stdout.decode(errors="replace"),
        "stderr": stderr.decode(errors="replace"),
    }


if __name__ == "__main__":
    while not os.path.exists(PORT):
        time.sleep(0.5)
    print("cube-test control agent on", PORT, file=sys.stderr, flush=True)
    serve(PORT)
