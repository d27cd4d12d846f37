"""The console's pages over plain HTTP: served without a key (they hold no data), with a strict CSP, and the
one script and stylesheet come from the gateway itself (no CDN)."""

from __future__ import annotations

import re

import pytest

from tests.gateway.gateway_harness import Stack

PAGES = [
    "/console/login",
    "/console/jobs",
    "/console/jobs/ftjob-0123456789ab",
    "/console/adapters",
    "/console/playground",
]


@pytest.mark.parametrize("path", PAGES)
def test_pages_are_shells_with_a_strict_policy(gw: Stack, path: str) -> None:
    with gw.gateway.http(authorized=False) as http:
        page = http.get(path)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert page.headers["cache-control"] == "no-store"
    html = page.text
    assert '<html lang="en">' in html and 'id="main"' in html
    assert not re.search(r"<script(?![^>]*\bsrc=)", html)  # every script is a file
    assert not re.search(r"\son[a-z]+=", html)  # no inline event handlers
    sources = re.findall(r'(?:src|href)="([^"#]+)"', html)
    assert all(s.startswith("/") or s.startswith("data:") for s in sources), sources  # nothing from elsewhere


def test_static_files_and_redirects(gw: Stack) -> None:
    with gw.gateway.http(authorized=False) as http:
        script = http.get("/console/static/console.js")
        style = http.get("/console/static/console.css")
        assert script.status_code == style.status_code == 200
        assert "javascript" in script.headers["content-type"] and "text/css" in style.headers["content-type"]
        assert "innerHTML" not in script.text  # API text goes in with textContent only
        assert http.get("/console/static/../app.py").status_code == 404
        assert http.get("/console").headers["location"] == "/console/jobs"
        assert http.get("/").headers["location"] == "/console/jobs"


def test_job_id_in_the_page_is_escaped(gw: Stack) -> None:
    with gw.gateway.http(authorized=False) as http:
        page = http.get('/console/jobs/"><img src=x onerror=alert(1)>')
    assert page.status_code == 200
    assert "<img src=x" not in page.text and "&lt;img src=x onerror=alert(1)&gt;" in page.text
