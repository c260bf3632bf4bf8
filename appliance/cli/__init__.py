"""The `cube` (and `cubemastercli`) command line: `main.py` holds the command groups,
`templates.py` the template build verbs, `common.py` what every command shares.

`main` stays importable from here: it is the console scripts' entry point
(`appliance.cli:main`), also in installs made before this was a package.
"""

from appliance.cli.main import main

__all__ = ["main"]
