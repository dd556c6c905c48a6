"""What the web UI's routes serve (`/static/`, `/vendor/`): scripts and styles, by suffix, with their media
types. Nothing else under web/ or node_modules/ is served (no package.json or lock file telling strangers
which library versions run here, no READMEs or sources).

Its own module, importing nothing, because two readers need the one table: the server (`routes.py`) and
the wheel's build step (`setup.py`, which copies exactly these files of the npm libraries into the wheel and
runs this file by path: importing the package at build time would import its dependencies).
"""

ASSET_TYPES = {".js": "text/javascript; charset=utf-8", ".mjs": "text/javascript; charset=utf-8",
               ".css": "text/css; charset=utf-8"}
