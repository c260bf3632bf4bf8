"""`python -m appliance.runtime.supervisor`: one sandbox's supervisor (see server.py)."""

from appliance.runtime.supervisor.server import main

main()
