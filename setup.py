"""The one build step pyproject.toml cannot say: the web chat UI's JavaScript libraries go into the wheel.

Everything else about the package is declared in pyproject.toml. The UI (lmforge/serve/web) loads marked,
DOMPurify and highlight.js from `/vendor/`, which `lmforge serve` answers from web/node_modules. In a checkout
`make setup` fills that folder (`npm ci`); an installed wheel has no checkout, so the wheel must carry the
files itself, or `pip install .` gives a server whose page loads without its libraries.

So, when a wheel is built, `build_py` also runs `npm ci` against web/package-lock.json in a temporary
folder (the exact versions and integrity hashes of the lock file; `--ignore-scripts`: no package's install
script runs during our build) and copies what the vendor route serves (the suffixes in
lmforge/serve/web_assets.py, the table the server reads too: the same files a checkout serves) and each
library's licence files into the wheel's lmforge/serve/web/node_modules. Nothing is written into the source
tree, and node_modules stays out of git.

With no npm (or npm failing) the build stops with one line saying what to do: a wheel without the
libraries would install fine and then serve a broken page, found only by its user. `LMFORGE_WEB=skip`
builds that wheel on purpose, with a warning (the API is unaffected; `/vendor/...` answers 404).

Editable installs (`pip install -e .`, as `make setup` does) skip all this: they serve the checkout's own
web/node_modules, which `make setup` fills, so they cost no npm run and no time.
"""

from __future__ import annotations

import os
import runpy
import shutil
import subprocess
import tempfile
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.errors import ExecError

WEB = Path("lmforge") / "serve" / "web"
# the suffixes the vendor route serves, from the server's own table: run by path, since importing lmforge here
# would import its dependencies at build time
SERVED = tuple(runpy.run_path(str(Path(__file__).resolve().parent / WEB.parent / "web_assets.py"))["ASSET_TYPES"])
LICENCES = ("license", "licence", "copying", "notice")  # name prefixes of the files that must travel with the code
NPM_CI = ["ci", "--ignore-scripts", "--omit=dev", "--no-audit", "--no-fund", "--prefer-offline"]


def _kept(path: Path) -> bool:
    return path.suffix in SERVED or path.name.lower().startswith(LICENCES)


class build_py_with_web(build_py):
    """`build_py`, plus the web UI's npm libraries in the built package (not for editable installs)."""

    def run(self) -> None:
        super().run()
        if not getattr(self, "editable_mode", False):
            self.add_web_libraries(Path(self.build_lib) / WEB / "node_modules")

    def add_web_libraries(self, target: Path) -> None:
        shutil.rmtree(target, ignore_errors=True)  # a previous build's copy, possibly of other versions
        if os.environ.get("LMFORGE_WEB", "").lower() == "skip":
            self.warn("LMFORGE_WEB=skip: building WITHOUT the web UI's libraries: the API works, but the chat "
                      "page at / will not (its /vendor/ files answer 404)")
            return
        npm = shutil.which("npm")
        if npm is None:
            raise ExecError("npm not found: building lmforge's wheel fetches the web UI's libraries with "
                            "'npm ci' (install Node.js), or set LMFORGE_WEB=skip to build without the web UI")
        with tempfile.TemporaryDirectory(prefix="lmforge-web-") as tmp:
            for name in ("package.json", "package-lock.json"):
                shutil.copy2(WEB / name, tmp)
            self.announce(f"fetching the web UI's libraries: npm {' '.join(NPM_CI)} ({WEB / 'package-lock.json'})",
                          level=2)
            done = subprocess.run([npm, *NPM_CI], cwd=tmp, stdin=subprocess.DEVNULL)
            if done.returncode != 0:
                raise ExecError(f"'npm ci' failed (exit {done.returncode}; its output is above) fetching the web "
                                "UI's libraries; fix that, or set LMFORGE_WEB=skip to build without the web UI")
            modules = Path(tmp) / "node_modules"
            copied = 0
            for path in sorted(modules.rglob("*")):
                rel = path.relative_to(modules)
                if path.is_file() and not any(p.startswith(".") for p in rel.parts) and _kept(path):
                    (target / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(path, target / rel)
                    copied += 1
            if not any(p.suffix in SERVED for p in target.rglob("*")):
                raise ExecError(f"'npm ci' installed no .js/.css files into {modules}: the web UI's libraries "
                                "are missing; set LMFORGE_WEB=skip to build without the web UI")
            self.announce(f"added {copied} files of the web UI's libraries to the wheel", level=2)


if __name__ == "__main__":  # as setuptools' build backend runs it (and importable without building anything)
    setup(cmdclass={"build_py": build_py_with_web})
