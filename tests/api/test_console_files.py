"""The console is served by the API itself: its page at `/`, its own files, and plotly.js from the plotly wheel."""

from __future__ import annotations

import gzip
import re
from pathlib import Path

from api.console.routes import STATIC_DIR
from api.console.vendor import PLOTLY_JS, package_file

REPO = Path(__file__).resolve().parents[2]


def test_the_page_is_at_the_root_with_a_strict_policy(api):
    page = api.client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    for asset in re.findall(r'(?:src|href)="(/console/[^"]+)"', page.text):
        assert api.client.get(asset).status_code == 200, asset


def test_every_page_module_the_router_names_exists():
    app_js = (STATIC_DIR / "js" / "app.js").read_text()
    pages = set(re.findall(r'\[/\^#.*?/, "(\w+)"\]', app_js))
    assert {"signin", "datasets", "file", "new_job", "jobs", "job", "registry", "playground", "fleet",
            "keys"} == pages
    for name in pages:
        assert (STATIC_DIR / "js" / "pages" / f"{name}.js").is_file(), name


def test_plotly_comes_from_the_installed_wheel_compressed(api):
    served = api.client.get("/console/vendor/plotly.min.js", headers={"Accept-Encoding": "gzip"})
    assert served.status_code == 200 and served.headers["content-encoding"] == "gzip"
    assert served.content == package_file(*PLOTLY_JS).read_bytes()  # the client decompressed it
    raw = api.client.get("/console/vendor/plotly.min.js", headers={"Accept-Encoding": "identity"})
    assert raw.headers.get("content-encoding") is None and len(raw.content) == len(served.content)
    assert len(gzip.compress(raw.content)) < len(raw.content) / 2


def test_no_third_party_javascript_is_in_the_repository():
    ours = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "api" / "console").rglob("*.js"))
    assert ours and all(p.startswith("api/console/static/js/") for p in ours)
    for path in ours:
        assert len((REPO / path).read_bytes()) < 60_000, f"{path} looks vendored"


def test_console_files_are_revalidated_and_unknown_ones_404(api):
    assert api.client.get("/console/static/js/app.js").headers["cache-control"] == "no-cache"
    missing = api.client.get("/console/static/js/nope.js")
    assert missing.status_code == 404
