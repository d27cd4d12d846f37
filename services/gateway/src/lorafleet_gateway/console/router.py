"""Routes: GET /console (-> jobs), /console/login, /console/jobs, /console/jobs/{id}, /console/adapters,
/console/playground, and /console/static/* (one CSS and one JS file shipped in this package: no CDN, no build).

The pages hold no data and need no key: the browser fetches everything from
/v1 with ``Authorization: Bearer <key>``. A strict Content-Security-Policy
(scripts, styles and connections from this origin only, no inline script)
keeps an injected string from running as code, since the key lives in the
tab's sessionStorage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

HERE = Path(__file__).resolve().parent
PREFIX = "/console"
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}


def install_console(app: FastAPI) -> None:
    """Mount the console's static files and add its page routes to ``app``."""
    templates = Jinja2Templates(directory=HERE / "templates")
    router = APIRouter(prefix=PREFIX, include_in_schema=False)

    def page(request: Request, template: str, title: str, section: str, **context: Any) -> Response:
        values = {"title": title, "page": template.removesuffix(".html"), "section": section, **context}
        return templates.TemplateResponse(request, template, values, headers=SECURITY_HEADERS)

    @router.get("")
    async def console_home() -> RedirectResponse:
        return RedirectResponse(f"{PREFIX}/jobs", status_code=307)

    @router.get("/login")
    async def login(request: Request) -> Response:
        return page(request, "login.html", "Sign in", "login")

    @router.get("/jobs")
    async def jobs(request: Request) -> Response:
        return page(request, "jobs.html", "Fine-tuning jobs", "jobs")

    @router.get("/jobs/{job_id}")
    async def job(request: Request, job_id: str) -> Response:
        return page(request, "job.html", f"Job {job_id}", "jobs", job_id=job_id)

    @router.get("/adapters")
    async def adapters(request: Request) -> Response:
        return page(request, "adapters.html", "Adapters", "adapters")

    @router.get("/playground")
    async def playground(request: Request) -> Response:
        return page(request, "playground.html", "Playground", "playground")

    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse(f"{PREFIX}/jobs", status_code=307)

    app.include_router(router)
    app.mount(f"{PREFIX}/static", StaticFiles(directory=HERE / "static"), name="console-static")
