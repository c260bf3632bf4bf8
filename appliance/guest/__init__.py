"""The in-sandbox agent: envd (port 49983) and the code interpreter (port 49999).

Runs on the guest's own python3 with only the stdlib and the Debian packages listed in
DEBIAN_PACKAGES; nothing from the host side of `appliance` may be imported here.
"""

# The envd semantics this agent implements (PROTOCOL.md §3.9: ≥ 0.6.4 enables every SDK feature).
ENVD_VERSION = "0.6.4"
# The console lines the agent prints, in this order (agent.py says when; hosts wait for them).
READY_LINE = "CUBE-AGENT-READY"
INTERPRETER_READY_LINE = "CUBE-INTERPRETER-READY"
