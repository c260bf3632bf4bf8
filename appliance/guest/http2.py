"""Whether HTTP/2 (h2c) can be served, without importing the h2 library on the start-up path.

h2 comes from Debian's python3-h2 (DEBIAN_PACKAGES). Templates built before it was
added do not have it: the agent then serves HTTP/1.1 only, which every E2B SDK speaks
over plain http://, and says so once on stderr.
"""

from __future__ import annotations

import functools
import importlib.util
import sys

# What an HTTP/2 client with prior knowledge sends first (RFC 9113 §3.4).
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


@functools.cache
def available() -> bool:
    try:
        if importlib.util.find_spec("h2") is not None:
            return True
    except ValueError:  # sys.modules["h2"] is None: import blocked
        pass
    print(
        "cube-agent: the h2 package is missing: serving HTTP/1.1 only (no h2c)", file=sys.stderr, flush=True
    )
    return False
