"""The wheel carries the whole web UI: built from a copy of the repo (setup.py's build step runs `npm ci` against
the lock file), installed into a bare folder, and served from there, not from the checkout, whose own
node_modules would hide a wheel without the libraries. npm runs offline, from the cache `make setup` filled
(skipped when that lacks them). Plus the build without npm: one clear error, unless LMFORGE_WEB=skip asks for
a wheel without the UI's libraries."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
WEB = ROOT / "lmforge" / "serve" / "web"
# what a checkout holds that is not source: never copied into the build (node_modules above all)
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "node_modules", "build", "dist", "*.egg-info", "runs",
                                    "__pycache__", ".pytest_cache", ".hypothesis", "*.pyc")


def _source_copy(tmp: Path) -> Path:
    src = tmp / "src"
    shutil.copytree(ROOT / "lmforge", src / "lmforge", ignore=NOT_SOURCE)
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    return src


def _build(src: Path, out: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                           "--no-cache-dir", "-w", str(out)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def _vendor_urls() -> list[str]:
    """Every /vendor/ file the UI's page and modules name."""
    text = "".join(p.read_text(encoding="utf-8") for p in [WEB / "index.html", *sorted(WEB.glob("*.js"))])
    urls = sorted(set(re.findall(r"/vendor/[^\"'`\s)]+", text)))
    assert len(urls) >= 4, urls  # marked, DOMPurify, highlight.js and its two styles at the time of writing
    return urls


@pytest.mark.skipif(shutil.which("npm") is None, reason="npm is not on PATH: the wheel build needs it to fetch the "
                    "web UI's libraries (install Node.js)")
def test_installed_wheel_serves_the_web_ui(tmp_path):
    src = _source_copy(tmp_path)
    # npm from its cache only (filled by `make setup`'s npm ci): the test never reaches the network
    built = _build(src, tmp_path / "dist", {"npm_config_offline": "true"})
    if built.returncode != 0 and "ENOTCACHED" in built.stdout + built.stderr:
        pytest.skip("npm's cache lacks the web UI's pinned libraries (run `make setup`, or "
                    "`npm ci --prefix lmforge/serve/web`, once with network access)")
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    assert not (src / "lmforge" / "serve" / "web" / "node_modules").exists()  # nothing written into the tree
    (wheel,) = (tmp_path / "dist").glob("lmforge-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    vendored = [n for n in names if "/node_modules/" in n]
    assert all(Path(n).suffix in (".js", ".mjs", ".css") or "licen" in n.lower() for n in vendored)
    for lib in ("marked", "dompurify", "@highlightjs/cdn-assets"):  # their licences travel with their code
        assert f"lmforge/serve/web/node_modules/{lib}/LICENSE" in names

    site = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "--target",
                           str(site), str(wheel)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    # The server runs from the installed copy: it checks, before serving, which lmforge it imported.
    script = ("import os, sys, lmforge; from pathlib import Path\n"
              "where = Path(lmforge.__file__).resolve()\n"
              "assert where.is_relative_to(Path(os.environ['SITE']).resolve()), f'imported {where}'\n"
              "from lmforge.cli import main; sys.exit(main(sys.argv[1:]))")
    env = {**os.environ, "PYTHONPATH": str(site), "SITE": str(site), "LMFORGE_HOME": str(tmp_path / "home"),
           "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script, "serve", "--port", "0"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url, lines, deadline = None, [], time.monotonic() + 60
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            m = re.search(r"API: (http://\S+)/v1", line)
            url = m.group(1) if m else None
        if url is None:
            proc.kill()
            pytest.fail("the installed server did not start: " + "".join(lines) + proc.stderr.read()[-3000:])
        page = httpx.get(url + "/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "/vendor/" in page.text
        types = {".js": "text/javascript", ".mjs": "text/javascript", ".css": "text/css"}
        for path in _vendor_urls():
            r = httpx.get(url + path)
            assert r.status_code == 200, path
            assert r.headers["content-type"].startswith(types[Path(path).suffix]), (path, r.headers["content-type"])
            assert r.content == (site / "lmforge/serve/web/node_modules" / path[len("/vendor/"):]).read_bytes()
        assert httpx.get(url + "/vendor/marked/package.json").status_code == 404
    finally:
        proc.terminate()
        proc.wait(30)


def test_the_build_copies_what_the_server_serves():
    """One table of served suffixes (lmforge/serve/web_assets.py): setup.py reads it rather than keeping a
    copy that could drift from the vendor route (a suffix served but not packed would 404 from a wheel)."""
    import runpy

    from lmforge.serve.routes import ASSET_TYPES

    setup = runpy.run_path(str(ROOT / "setup.py"), run_name="setup")  # importable without building anything
    assert setup["SERVED"] == tuple(ASSET_TYPES)
    assert not re.search(r"""["']\.(m?js|css)["']""", (ROOT / "setup.py").read_text(encoding="utf-8"))


def test_wheel_without_npm_is_one_clear_error_unless_skipped(tmp_path):
    src = _source_copy(tmp_path)
    no_npm = {"PATH": str(tmp_path / "empty-path")}  # pip runs the build with sys.executable: no PATH needed
    failed = _build(src, tmp_path / "dist", no_npm)
    assert failed.returncode != 0
    errors = [line.strip() for line in (failed.stdout + failed.stderr).splitlines() if "npm not found" in line]
    assert errors and "LMFORGE_WEB=skip" in errors[0], failed.stdout[-2000:] + failed.stderr[-2000:]
    assert "Traceback" not in failed.stdout + failed.stderr

    skipped = _build(src, tmp_path / "dist", {**no_npm, "LMFORGE_WEB": "skip"})
    assert skipped.returncode == 0, skipped.stdout[-3000:] + skipped.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("lmforge-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "lmforge/serve/web/index.html" in names  # the UI's own files, without its libraries
    assert not [n for n in names if "/node_modules/" in n]
