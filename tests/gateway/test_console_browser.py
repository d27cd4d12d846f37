"""The web console in a real headless browser (Debian's Chromium driven by Playwright) against the real gateway
and the fake upstreams: sign in with a key, a finished job's loss curve, a live one, the adapters page, the
playground (one model, then two side by side). A screenshot of each page goes to artifacts/console/.

Needs `apt-get install -y chromium` and `pip install playwright==1.65.2` (never `playwright install`: the
system Chromium is used); skipped with that reason when either is missing.
"""

from __future__ import annotations

import io
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.gateway.gateway_fakes import publish_dummy_adapter
from tests.gateway.gateway_harness import BASE_MODEL, Stack, wait_for

try:
    from playwright.sync_api import Browser, Page, expect, sync_playwright
except ImportError:  # pragma: no cover - depends on the machine
    pytest.skip("playwright is not installed (pip install playwright==1.65.2)", allow_module_level=True)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).exists():  # pragma: no cover - depends on the machine
    pytest.skip("Chromium is not installed (apt-get install -y chromium)", allow_module_level=True)

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
SHOTS = Path(__file__).resolve().parents[2] / "artifacts" / "console"
JSONL = b'{"messages": [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "Fleet."}]}\n'
STEPS = 12


@dataclass
class Tenant:
    id: str
    key: str
    job_id: str
    adapter: str = "support-bot"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def tenant(stack: Stack) -> Tenant:
    """A tenant of its own (so its pages show only what these tests made): an adapter and a finished job."""
    key = stack.new_key(stack.new_tenant())
    publish_dummy_adapter(stack.store, f"{key['tenant_id']}/support-bot", "v1", base_model=BASE_MODEL, final_loss=0.31)
    client = stack.gateway.client(api_key=key["key"])
    file_id = client.files.create(file=("train.jsonl", io.BytesIO(JSONL)), purpose="fine-tune").id
    job_id = client.fine_tuning.jobs.create(model=BASE_MODEL, training_file=file_id, suffix="console").id
    stack.loop.call(lambda: stack.trainer.run_to_success(job_id, steps=STEPS))
    return Tenant(key["tenant_id"], key["key"], job_id)


@pytest.fixture
def page(browser: Browser, gw: Stack) -> Iterator[Page]:
    """A fresh tab at 1280x800 (a laptop); fails the test on any script error or CSP violation it logged."""
    context = browser.new_context(viewport={"width": 1280, "height": 800}, base_url=gw.gateway.url)
    tab = context.new_page()
    problems: list[str] = []
    tab.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    tab.on("console", lambda msg: problems.append(f"console {msg.type}: {msg.text}") if msg.type == "error" else None)
    yield tab
    context.close()
    assert not [p for p in problems if "401" not in p], problems  # a rejected key is an expected console error


def sign_in(page: Page, key: str) -> None:
    page.goto("/console/login")
    page.keyboard.type(key)  # the key field has focus: keyboard only
    page.keyboard.press("Enter")
    page.wait_for_url("**/console/jobs")


def test_sign_in_and_jobs(page: Page, tenant: Tenant) -> None:
    page.goto("/console/jobs")
    page.wait_for_url("**/console/login?next=%2Fconsole%2Fjobs")  # no key yet
    expect(page.get_by_label("API key")).to_be_focused()
    page.screenshot(path=SHOTS / "login.png")
    page.get_by_label("API key").fill("lf-not-a-real-key")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_have_text("That API key was not accepted.")

    page.get_by_label("API key").fill(tenant.key)
    page.keyboard.press("Enter")
    page.wait_for_url("**/console/jobs")
    row = page.get_by_role("row").filter(has_text=tenant.job_id)
    expect(row).to_contain_text("succeeded")
    expect(row).to_contain_text(f"{STEPS}/{STEPS}")
    expect(row).to_contain_text(f"ft:smollm2-135m-instruct:{tenant.id}:console:")
    expect(page.get_by_role("link", name="Jobs")).to_have_attribute("aria-current", "page")
    page.screenshot(path=SHOTS / "jobs.png")

    page.get_by_role("button", name="Sign out").click()
    page.wait_for_url("**/console/login")
    page.goto("/console/adapters")
    page.wait_for_url("**/console/login?next=*")  # the key is gone from the tab


def test_finished_job_shows_its_loss_curve(page: Page, tenant: Tenant) -> None:
    sign_in(page, tenant.key)
    page.get_by_role("link", name=tenant.job_id).click()
    page.wait_for_url(f"**/console/jobs/{tenant.job_id}")
    expect(page.locator("#stream-status")).to_contain_text("finished")
    expect(page.locator("#job-status")).to_have_text("succeeded")
    points = page.locator("#loss-chart polyline.loss-line").get_attribute("points") or ""
    coords = [tuple(map(float, p.split(","))) for p in points.split()]
    assert len(coords) == STEPS
    assert [x for x, _ in coords] == sorted(x for x, _ in coords)  # steps left to right
    assert coords[0][1] < coords[-1][1]  # loss 2.0 -> 0.17: SVG y grows downwards
    expect(page.locator("#loss-chart circle.loss-point")).to_have_count(STEPS)
    expect(page.locator("#loss-desc")).to_contain_text(f"{STEPS} step(s) recorded")
    expect(page.locator("#loss-table tbody tr")).to_have_count(STEPS)
    expect(page.locator("#events li").first).to_contain_text("published")
    expect(page.get_by_role("link", name="Chat with it")).to_be_visible()
    expect(page.get_by_role("button", name="Cancel job")).to_be_hidden()
    page.screenshot(path=SHOTS / "job.png", full_page=True)


def test_running_job_curve_grows_live(page: Page, gw: Stack, tenant: Tenant) -> None:
    sign_in(page, tenant.key)
    client = gw.gateway.client(api_key=tenant.key)
    file_id = client.files.create(file=("train.jsonl", io.BytesIO(JSONL)), purpose="fine-tune").id
    gw.trainer.auto_steps, gw.trainer.step_delay_s = 8, 0.3
    try:
        job_id = client.fine_tuning.jobs.create(model=BASE_MODEL, training_file=file_id).id
        page.goto(f"/console/jobs/{job_id}")
        expect(page.locator("#loss-chart polyline.loss-line")).to_have_count(1)
        early = len((page.locator("#loss-chart polyline").get_attribute("points") or "").split())
        assert early < 8, "the curve should be drawn while the job runs, not only at the end"
        expect(page.locator("#job-status")).to_have_text("succeeded", timeout=10_000)
        expect(page.locator("#loss-chart circle.loss-point")).to_have_count(8)
    finally:
        gw.trainer.auto_steps = 0


def test_adapters_page_shows_versions_placement_and_traffic(page: Page, gw: Stack, tenant: Tenant) -> None:
    client = gw.gateway.client(api_key=tenant.key)
    client.chat.completions.create(model=tenant.adapter, messages=[{"role": "user", "content": "hello"}])
    with gw.gateway.http(api_key=tenant.key) as http:
        assert wait_for(lambda: http.get(f"/v1/lorafleet/adapters/{tenant.adapter}").json()["loaded_on"] != [])
    sign_in(page, tenant.key)
    page.get_by_role("link", name="Adapters").click()
    row = page.get_by_role("row").filter(has_text=tenant.adapter)
    expect(row).to_contain_text("v1 (latest)")
    expect(row).to_contain_text("0.3100")
    expect(row).to_contain_text("replica-")  # a tenant sees opaque replica ids
    expect(row.locator("td").nth(5)).to_have_text("1")  # requests
    row.get_by_text("details").click()
    expect(row).to_contain_text("System prompt: You are Fleet.")
    page.screenshot(path=SHOTS / "adapters.png")
    row.get_by_role("link", name=f"Chat with {tenant.adapter}").click()
    page.wait_for_url(f"**/console/playground?model={tenant.adapter}")
    expect(page.get_by_label("Model", exact=True)).to_have_value(tenant.adapter)


def test_playground_chat_then_compare_side_by_side(page: Page, gw: Stack, tenant: Tenant) -> None:
    sign_in(page, tenant.key)
    page.goto("/console/playground")
    page.get_by_label("Model", exact=True).select_option(tenant.adapter)
    page.get_by_label("Message").fill("Who are you?")
    page.keyboard.press("Enter")
    expect(page.locator("#transcript-a")).to_contain_text(f"Hello from {tenant.id}/{tenant.adapter} choice0. Bye!")
    expect(page.locator("#chat-status")).to_have_text("Answered.")

    page.get_by_label("Compare side by side").check()
    page.get_by_label("Second model", exact=True).select_option(BASE_MODEL)
    page.get_by_label("Message").fill("And now?")
    page.get_by_role("button", name="Send").click()
    expect(page.locator("#chat-status")).to_have_text("Answered.")
    expect(page.locator("#transcript-a .msg.assistant")).to_have_count(2)
    expect(page.locator("#transcript-b")).to_contain_text("Hello from base choice0. Bye!")
    expect(page.locator("#meta-b")).to_contain_text("first token")
    to_adapter = [r for r in gw.all_requests() if r.adapter.startswith(f"{tenant.id}/")][-1]
    assert [m.content for m in to_adapter.chat.messages] == [
        "Who are you?",
        to_adapter.chat.messages[1].content,
        "And now?",
    ]
    page.screenshot(path=SHOTS / "playground.png")


def test_pages_are_labelled_and_fit_a_laptop(page: Page, tenant: Tenant) -> None:
    sign_in(page, tenant.key)
    for path in ("/console/jobs", "/console/adapters", "/console/playground", "/console/login"):
        page.goto(path)
        page.wait_for_load_state("networkidle")
        facts = page.evaluate(
            """() => ({
                overflow: document.documentElement.scrollWidth - window.innerWidth,
                unlabelled: [...document.querySelectorAll("input, select, textarea, button")]
                    .filter((e) => !e.hidden && !(e.labels && e.labels.length) && !e.getAttribute("aria-label")
                                   && !(e.tagName === "BUTTON" && e.textContent.trim()))
                    .map((e) => e.id || e.outerHTML),
                h1: document.querySelectorAll("h1").length,
                lang: document.documentElement.lang,
            })"""
        )
        assert facts == {"overflow": 0, "unlabelled": [], "h1": 1, "lang": "en"}, path
        if path != "/console/login":  # (the login page focuses its key field)
            page.keyboard.press("Tab")
            assert page.evaluate("document.activeElement.textContent") == "Skip to content", path
