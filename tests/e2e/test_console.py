"""The web console in a real browser (Debian's chromium) against a live `patchbay serve` on the tiny model.

One user's afternoon, in order: sign in, upload a good and a broken dataset, create a job from the form
(a bad field first), watch its loss chart grow, promote the adapter with an alias, compare base and
adapter side by side in the playground, then sign in as another team and find none of it. Every page is
screenshotted at 1280 and 390 px into tests/artifacts/console/, and its browser console must stay clean.
"""

from __future__ import annotations

import json
import re
import time

import httpx
import pytest

from tests.support.browser import ARTIFACTS, ConsoleLog, chromium, chromium_path, screenshot
from tests.support.datasets import chat_lines, preference_lines, to_jsonl
from tests.support.live_serve import live_serve

pytestmark = pytest.mark.slow

BASE = "tiny-llama"
FAILED_LOAD = re.compile(r"Failed to load resource: the server responded with a status of (\d+)")


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_dir):
    chromium_path()  # skip (or fail in CI) before starting anything when there is no browser
    with live_serve(tmp_path_factory.mktemp("console"), BASE, tiny_model_dir) as live:
        yield live


@pytest.fixture(scope="module")
def api(served):
    with httpx.Client(base_url=served.url, headers={"Authorization": f"Bearer {served.key}"}, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def console(served):
    """One browser tab for the whole flow, and the log of what its console printed."""
    log = ConsoleLog()
    with chromium() as browser:
        context = browser.new_context(viewport={"width": 1280, "height": 860})
        page = context.new_page()
        page.set_default_timeout(30_000)
        log.watch(page)
        yield page, log
        context.close()


state: dict = {}


def open_page(page, served, hash_: str, name: str) -> None:
    """Go to a console route and wait until its page has rendered."""
    page.goto(f"{served.url}/{hash_}")
    page.wait_for_selector(f"main[data-page='{name}'][data-ready='1']")


def assert_clean(log: ConsoleLog, expected_statuses: tuple[int, ...] = ()) -> None:
    """No console errors or warnings, except the network log lines of API errors this step provoked."""
    problems = [p for p in log.take()
                if not ((m := FAILED_LOAD.search(p)) and int(m.group(1)) in expected_statuses)]
    assert problems == []


def sign_in(page, served, key: str) -> None:
    open_page(page, served, "#/signin", "signin")
    page.fill("#api-key", key)
    page.click("#signin-form button[type=submit]")
    page.wait_for_selector("main[data-page='datasets'][data-ready='1']")


def test_sign_in_shows_the_apis_error_for_a_wrong_key(served, console):
    page, log = console
    open_page(page, served, "#/datasets", "signin")  # not signed in: sent to the sign-in page
    page.fill("#api-key", "pb-not-a-key")
    page.click("#signin-form button[type=submit]")
    assert "Incorrect API key" in page.locator("#signin-status .error-box").inner_text()
    page.keyboard.press("Shift+Tab")  # from the submit button back to the key: keyboard focus is visible
    focused = page.evaluate("[document.activeElement.id, getComputedStyle(document.activeElement).outlineStyle]")
    assert focused[0] == "api-key" and focused[1] not in ("none", ""), focused
    screenshot(page, "signin")
    sign_in(page, served, served.key)
    assert "default" in page.locator("#team-name").inner_text()
    assert_clean(log, expected_statuses=(401,))


def _upload(page, name: str, content: bytes) -> None:
    page.set_input_files("#file-input", files=[{"name": name, "mimeType": "application/jsonl", "buffer": content}])
    page.wait_for_selector(f"#files-table tr:has-text('{name}')", timeout=60_000)


def test_upload_a_valid_and_an_invalid_dataset_and_see_the_line_errors(served, console, api):
    page, log = console
    _upload(page, "train.jsonl", to_jsonl(chat_lines(120)))
    _upload(page, "valid.jsonl", to_jsonl(chat_lines(16)))
    good = to_jsonl(chat_lines(2)).decode().splitlines()
    _upload(page, "broken.jsonl", "\n".join([good[0], "{not json", json.dumps({"messages": "nope"}), good[1]]).encode())
    files = {f["filename"]: f for f in api.get("/v1/files").json()["data"]}
    assert files["train.jsonl"]["status"] == "processed" and files["broken.jsonl"]["status"] == "error"
    state["files"] = {name: f["id"] for name, f in files.items()}
    row = page.locator("#files-table tr", has_text="train.jsonl")
    assert "processed" in row.inner_text() and "120" in row.inner_text()
    screenshot(page, "datasets")

    page.locator("#files-table a", has_text="broken.jsonl").click()
    page.wait_for_selector("main[data-page='file'][data-ready='1']")
    page.wait_for_selector("#file-errors .line-error[data-line='3']")
    second = page.locator("#file-errors .line-error[data-line='2']").inner_text()
    assert "invalid JSON" in second and "{not json" in second
    assert "nope" in page.locator("#file-errors .line-error[data-line='3']").inner_text()
    screenshot(page, "file-invalid")
    open_page(page, served, f"#/files/{state['files']['train.jsonl']}", "file")
    page.wait_for_selector("#file-preview")
    preview = page.locator("#file-preview").inner_text().lower()
    assert "user" in preview and "assistant" in preview and "line 1" in preview
    screenshot(page, "file")
    assert_clean(log)


def _field(page, name: str):
    return page.locator(f"#job-form [name='{name}']")


def test_the_job_form_shows_errors_beside_their_fields_then_creates_the_job(served, console, api):
    page, log = console
    open_page(page, served, "#/jobs/new", "new_job")
    _field(page, "model").select_option(BASE)
    _field(page, "training_file").select_option(state["files"]["train.jsonl"])
    _field(page, "validation_file").select_option(state["files"]["valid.jsonl"])
    _field(page, "peft.method").select_option("lora")
    _field(page, "peft.r").fill("0")
    _field(page, "suffix").fill("not a valid suffix!")
    page.click("#job-form button[type=submit]")
    rank_error = page.locator(".field[data-field='peft.r'] .field-error")
    suffix_error = page.locator(".field[data-field='suffix'] .field-error")
    rank_error.wait_for()
    assert rank_error.inner_text() and suffix_error.inner_text()  # both at once, each beside its field
    assert api.get("/v1/fine_tuning/jobs").json()["data"] == []
    screenshot(page, "new-job-errors")

    _field(page, "peft.r").fill("4")
    _field(page, "suffix").fill("console")
    _field(page, "hyperparameters.n_epochs").fill("12")
    _field(page, "hyperparameters.batch_size").fill("2")
    _field(page, "peft.eval_every_steps").fill("30")
    page.click("#job-form button[type=submit]")
    page.wait_for_selector("main[data-page='job'][data-ready='1']")
    jobs = api.get("/v1/fine_tuning/jobs").json()["data"]
    assert len(jobs) == 1 and jobs[0]["peft"]["r"] == 4 and jobs[0]["suffix"] == "console"
    state["job"] = jobs[0]["id"]
    assert state["job"] in page.url
    assert_clean(log, expected_statuses=(400,))


def test_a_dpo_job_from_the_form_takes_beta_and_a_preference_file(served, console, api):
    page, log = console
    open_page(page, served, "#/datasets", "datasets")
    _upload(page, "pairs.jsonl", to_jsonl(preference_lines(12)))
    pairs = next(f["id"] for f in api.get("/v1/files").json()["data"] if f["filename"] == "pairs.jsonl")
    open_page(page, served, f"#/files/{pairs}", "file")
    page.wait_for_selector("#file-preview")
    preview = page.locator("#file-preview").inner_text().lower()
    assert "not preferred (assistant)" in preview and "preferred (assistant)" in preview

    open_page(page, served, "#/jobs/new", "new_job")
    beta = _field(page, "method.dpo.hyperparameters.beta")
    assert not beta.is_visible()
    _field(page, "model").select_option(BASE)
    _field(page, "training_file").select_option(pairs)
    _field(page, "method.type").select_option("dpo")
    beta.fill("20")
    _field(page, "hyperparameters.n_epochs").fill("0")
    page.click("#job-form button[type=submit]")
    beta_error = page.locator(".field[data-field='method.dpo.hyperparameters.beta'] .field-error")
    epochs_error = page.locator(".field[data-field='hyperparameters.n_epochs'] .field-error")
    wait_until(page, lambda: beta_error.inner_text() and epochs_error.inner_text(), 15)

    beta.fill("0.2")
    _field(page, "hyperparameters.n_epochs").fill("1")
    page.click("#job-form button[type=submit]")
    page.wait_for_selector("main[data-page='job'][data-ready='1']")
    job = next(j for j in api.get("/v1/fine_tuning/jobs").json()["data"] if j["training_file"] == pairs)
    assert job["method"]["type"] == "dpo" and job["method"]["dpo"]["hyperparameters"]["beta"] == 0.2
    assert job["method"]["dpo"]["hyperparameters"]["n_epochs"] == 1
    api.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")  # the first job keeps the worker
    assert_clean(log, expected_statuses=(400,))
    open_page(page, served, f"#/jobs/{state['job']}", "job")  # where the next test watches the first job


def wait_until(page, condition, seconds: float) -> None:
    """Poll `condition` from here (the page's policy forbids the string eval of `wait_for_function`)."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {seconds} s"
        page.wait_for_timeout(200)


def _chart_points(page) -> int:
    return int(page.locator("#loss-chart").get_attribute("data-points") or 0)


def test_the_loss_chart_gains_points_while_the_job_runs(served, console, api):
    page, log = console
    wait_until(page, lambda: _chart_points(page) > 0, 180)
    first = _chart_points(page)
    status = api.get(f"/v1/fine_tuning/jobs/{state['job']}").json()["status"]
    assert status == "running", f"the job ended before the chart could be seen growing ({status})"
    wait_until(page, lambda: _chart_points(page) > first, 120)
    assert _chart_points(page) > first  # the same page, fed by the event stream: no reload
    page.wait_for_selector("#job-status:has-text('succeeded')", timeout=300_000)
    assert int(page.locator("#loss-chart").get_attribute("data-valid-points") or 0) > 0
    traces = page.evaluate("document.getElementById('loss-chart').data.map(t => t.name)")
    assert len(traces) == 3, traces  # train loss, validation loss, learning rate
    screenshot(page, "job")
    page.set_viewport_size({"width": 1280, "height": 640})  # the README's picture: the chart's card
    page.evaluate("document.getElementById('loss-chart').closest('.card').scrollIntoView(); window.scrollBy(0, -70)")
    page.wait_for_timeout(500)
    page.screenshot(path=str(ARTIFACTS / "readme-job.png"))
    page.set_viewport_size({"width": 1280, "height": 860})
    open_page(page, served, "#/jobs", "jobs")
    assert "succeeded" in page.locator("#jobs-table").inner_text()
    screenshot(page, "jobs")
    assert_clean(log)


def test_promote_the_adapter_with_an_alias(served, console, api):
    page, log = console
    adapters = api.get("/v1/adapters").json()["data"]
    assert len(adapters) == 1
    name = state["adapter"] = adapters[0]["name"]
    open_page(page, served, "#/registry", "registry")
    group = page.locator(f"section.adapter-group[data-name='{name}']")
    group.locator("input[name=alias]").fill("prod")
    group.locator("button.promote").click()
    page.locator("dialog.confirm button.danger").click()
    page.locator(f"section.adapter-group[data-name='{name}'] .alias-list li[data-alias='prod']").wait_for()
    assert "prod" in page.locator(f"section.adapter-group[data-name='{name}'] .alias-chip").inner_text()
    aliases = api.get(f"/v1/adapters/{name}/aliases").json()["data"]
    assert [(a["alias"], a["adapter_id"]) for a in aliases][:1] == [("prod", adapters[0]["id"])], aliases
    screenshot(page, "registry")
    assert_clean(log)


def _streamed_answer(page, model: str) -> str:
    answer = page.locator(f".answer[data-model='{model}']")
    answer.and_(page.locator("[data-done='1']")).wait_for(timeout=120_000)
    assert answer.locator(".error-box").count() == 0, answer.inner_text()
    return answer.locator(".answer-text").evaluate("el => el.textContent")


def test_the_playground_streams_base_and_adapter_side_by_side_like_the_api(served, console, api):
    page, log = console
    adapter = f"{state['adapter']}:prod"
    open_page(page, served, "#/playground", "playground")
    for model in (BASE, adapter):
        page.locator(f"input[name=model][value='{model}']").check()
    page.fill("#system-prompt", "You are terse.")
    page.fill("#prompt", "Name a colour.")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "12")
    page.click("#send")
    shown = {model: _streamed_answer(page, model) for model in (BASE, adapter)}
    for model, text in shown.items():
        messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
        reply = api.post("/v1/chat/completions",
                         json={"model": model, "temperature": 0, "max_tokens": 12, "messages": messages})
        assert reply.status_code == 200, reply.text
        assert text == reply.json()["choices"][0]["message"]["content"], model
    for model in shown:
        assert page.locator(f".answer[data-model='{model}'] .ttft").inner_text().strip()
    screenshot(page, "playground")
    assert_clean(log)


def test_fleet_and_keys_pages_for_an_admin(served, console):
    page, log = console
    open_page(page, served, "#/fleet", "fleet")
    page.wait_for_selector("#replicas-table")
    assert BASE in page.locator("#replicas-table").inner_text()
    screenshot(page, "fleet")
    open_page(page, served, "#/keys", "keys")
    page.click("#create-key-form button[type=submit]")
    secret = page.locator("#new-key-secret")
    secret.wait_for()
    assert secret.inner_text().startswith("pb-")
    screenshot(page, "keys")
    assert_clean(log)


def test_another_team_sees_none_of_it(served, console):
    page, log = console
    other_key = served.cli("team", "create", "globex").strip().splitlines()[-1]
    page.click("#sign-out")
    page.wait_for_selector("main[data-page='signin'][data-ready='1']")
    assert page.evaluate("sessionStorage.length") == 0
    sign_in(page, served, other_key)
    mine = [*state["files"].values(), "train.jsonl", "broken.jsonl", state["job"], state["adapter"]]
    for hash_, name in (("#/datasets", "datasets"), ("#/jobs", "jobs"), ("#/registry", "registry"),
                        ("#/playground", "playground")):
        open_page(page, served, hash_, name)
        page.wait_for_timeout(500)
        text = page.locator("main").inner_text()
        assert not [thing for thing in mine if thing in text], (name, text)
    open_page(page, served, "#/fleet", "fleet")
    assert "admin key" in page.locator("main").inner_text()
    assert_clean(log)
