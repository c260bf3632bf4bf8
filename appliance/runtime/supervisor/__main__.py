"""`python -m appliance.runtime.supervisor`: one sandbox's supervisor (see server.py);
`python -m appliance.runtime.supervisor zygote`: the zygote that forks them (see zygote.py)."""

import sys

from appliance.runtime.supervisor.protocol import ZYGOTE_ARGUMENT

if sys.argv[1:] == [ZYGOTE_ARGUMENT]:
    from appliance.runtime.supervisor.zygote import main
else:
    from appliance.runtime.supervisor.server import main

main()
