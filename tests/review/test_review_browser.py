"""index.html in headless Chromium: no console errors, no failed or outside requests, every grid loads.

Drives Chromium through the DevTools protocol over a pipe (``--remote-debugging-pipe``: JSON
messages ending in NUL on fds 3 and 4), with the standard library only. Debian: ``apt-get
install -y chromium``. Skipped, with the reason, when ``chromium`` is not on the PATH.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from mmart.review import run_review

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--remote-debugging-pipe", "--window-size=1200,1600"]
TIMEOUT = 30.0

pytestmark = [
    pytest.mark.browser,
    pytest.mark.needs_extra,
    pytest.mark.skipif(CHROMIUM is None, reason="chromium is not on the PATH (Debian: apt-get install -y chromium)"),
]


class Chromium:
    """A headless Chromium driven over the DevTools pipe; collects events of one page session."""

    def __init__(self, user_data_dir: Path):
        # Chromium reads commands from fd 3 and writes replies to fd 4; park our ends above 100 first
        # so that the dup2 calls in the child cannot clobber one another.
        cmd_r, cmd_w = os.pipe()
        res_r, res_w = os.pipe()
        self._child = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in (cmd_r, res_w)]
        for fd in (cmd_r, res_w):
            os.close(fd)
        child_r, child_w = self._child

        def wire_fds() -> None:  # runs in the child between fork and exec
            os.dup2(child_r, 3)
            os.dup2(child_w, 4)

        self.proc = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={user_data_dir}", "about:blank"],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     pass_fds=(3, 4), preexec_fn=wire_fds)
        for fd in self._child:
            os.close(fd)
        self._w, self._r = cmd_w, res_r
        self._buf = b""
        self._id = 0
        self.events: list[dict] = []

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        while True:
            reply = self._next()
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def wait_for(self, method: str) -> dict:
        for i, e in enumerate(self.events):
            if e.get("method") == method:
                return self.events.pop(i)
        while True:
            e = self._next()
            if e.get("method") == method:
                return e
            self.events.append(e)

    def _next(self) -> dict:
        deadline = time.monotonic() + TIMEOUT
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._r], [], [], left)[0]:
                raise TimeoutError(f"no reply from chromium in {TIMEOUT}s")
            chunk = os.read(self._r, 1 << 16)
            if not chunk:
                raise RuntimeError(f"chromium exited: {self.proc.stderr.read().decode(errors='replace')[-2000:]}")
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except (OSError, RuntimeError, TimeoutError):
            pass
        for fd in (self._w, self._r):
            os.close(fd)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def visit(browser: Chromium, url: str, probe: str | None = None) -> dict:
    """Open ``url`` in a new tab, load every lazy image, and report what went wrong (and ``probe``'s value: a
    JavaScript expression evaluated in the loaded page)."""
    target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    for domain in ("Page", "Runtime", "Log", "Network"):
        browser.send(f"{domain}.enable", session=session)
    browser.events.clear()
    browser.send("Page.navigate", {"url": url}, session=session)
    browser.wait_for("Page.loadEventFired")
    # Lazy images below the fold are not fetched yet: make them eager and wait for each to decode.
    images = browser.send("Runtime.evaluate", {
        "expression": """Promise.all(Array.from(document.images, img => {
            img.loading = "eager";
            return img.decode().then(() => [img.getAttribute("src"), img.naturalWidth, img.naturalHeight],
                                     () => [img.getAttribute("src"), 0, 0]);
        }))""",
        "awaitPromise": True, "returnByValue": True}, session=session)["result"]["value"]
    browser.send("Runtime.evaluate", {"expression": "0"}, session=session)  # flush pending events
    probed = None if probe is None else browser.send(
        "Runtime.evaluate", {"expression": probe, "returnByValue": True}, session=session)["result"].get("value")
    ev = [e for e in browser.events if e.get("sessionId") == session]
    browser.send("Target.closeTarget", {"targetId": target})
    return {
        "probe": probed,
        "images": images,
        "requests": [e["params"]["request"]["url"] for e in ev if e["method"] == "Network.requestWillBeSent"],
        "failed": [(e["params"].get("errorText"), e["params"].get("blockedReason")) for e in ev
                   if e["method"] == "Network.loadingFailed"],
        "console": [e["params"] for e in ev if e["method"] == "Runtime.consoleAPICalled"
                    and e["params"]["type"] in ("error", "warning", "assert")],
        "exceptions": [e["params"] for e in ev if e["method"] == "Runtime.exceptionThrown"],
        "log": [e["params"]["entry"] for e in ev if e["method"] == "Log.entryAdded"
                and e["params"]["entry"]["level"] in ("error", "warning")],
    }


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    b = Chromium(tmp_path_factory.mktemp("chromium-profile"))
    yield b
    b.close()


def test_page_opens_without_errors_or_failed_requests(browser, tiny_world, tiny_preds, tmp_path):
    index = run_review(tiny_world, tmp_path / "review", preds=tiny_preds, members=4, progress=False).index
    got = visit(browser, index.as_uri())
    problems = {k: got[k] for k in ("failed", "console", "exceptions", "log") if got[k]}
    assert not problems, problems
    assert len(got["images"]) == 4 and all(w > 0 and h > 0 for _, w, h in got["images"]), got["images"]
    assert all(u.startswith(("file://", "data:")) for u in got["requests"]), got["requests"]
    assert sum(u.endswith(".png") for u in got["requests"]) == 4


def test_the_check_catches_a_broken_page(browser, tmp_path):
    """The check itself must see errors: a missing image, an outside request, a console error."""
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><head><link rel="icon" href="data:,"></head><body>'
                   '<img src="missing.png" loading="lazy"><img src="http://127.0.0.1:9/x.png">'
                   '<script>console.error("boom")</script></body></html>')
    got = visit(browser, bad.as_uri())
    assert len(got["failed"]) == 2
    assert [c["args"][0]["value"] for c in got["console"]] == ["boom"]
    assert ("missing.png", 0, 0) in [tuple(i) for i in got["images"]]


PAYLOADS = {"script": "<script>window.__pwned=1</script>",
            "img": '<img src=x onerror="window.__pwned=1">',
            "svg": '"><svg onload="window.__pwned=1">'}
# What the loaded page holds: did anything run, did any payload become an element, is each payload there as text?
PROBE = """({
    pwned: typeof window.__pwned,
    scripts: document.querySelectorAll("script").length,
    svgs: document.querySelectorAll("svg").length,
    stray_imgs: document.querySelectorAll('img[src="x"]').length,
    handlers: Array.from(document.querySelectorAll("*")).flatMap(
        e => Array.from(e.attributes).filter(a => a.name.startsWith("on")).map(a => e.tagName + " " + a.name)),
    text: document.body.innerText,
})"""


def test_html_payloads_in_the_data_stay_text_in_the_browser(browser, world_copy, tmp_path):
    """Title names, genres, captions and a member id holding markup render as text: nothing runs, no element."""
    import pandas as pd

    from mmart.review import Filters

    from fake_preds import fabricate_predictions

    preds = fabricate_predictions(world_copy)
    user, title = preds.iloc[0].user_id, preds.iloc[0].title_id
    evil_user = "m" + PAYLOADS["svg"]
    titles = pd.read_parquet(world_copy / "titles.parquet")
    row = titles.title_id == title
    titles.loc[row, "name"] = PAYLOADS["script"]
    titles.loc[row, "genres"] = pd.Series([["drama", PAYLOADS["img"]]], index=titles.index[row])
    titles.to_parquet(world_copy / "titles.parquet", index=False)
    arts = pd.read_parquet(world_copy / "artworks.parquet")
    arts.loc[arts.title_id == title, "caption"] = PAYLOADS["img"]
    arts.to_parquet(world_copy / "artworks.parquet", index=False)
    for name in ("users", "impressions", "oracle"):  # the member's id, everywhere it is written
        frame = pd.read_parquet(world_copy / f"{name}.parquet")
        frame.loc[frame.user_id == user, "user_id"] = evil_user
        frame.to_parquet(world_copy / f"{name}.parquet", index=False)
    preds.loc[preds.user_id == user, "user_id"] = evil_user
    preds_path = tmp_path / "preds.parquet"
    preds.to_parquet(preds_path, index=False)

    index = run_review(world_copy, tmp_path / "review", preds=preds_path, filters=Filters(member=evil_user),
                       progress=False).index
    got = visit(browser, index.as_uri(), PROBE)
    page = got["probe"]
    assert page["pwned"] == "undefined"
    assert (page["scripts"], page["svgs"], page["stray_imgs"], page["handlers"]) == (0, 0, 0, []), page
    for kind, payload in PAYLOADS.items():
        assert payload in page["text"], f"the {kind} payload is not shown as text"
    assert not got["exceptions"], got["exceptions"]


def test_html_payload_in_a_rationale_stays_text_in_the_browser(browser, tiny_world, tmp_path):
    """The model's own rationale (the predictions' rationale column) holding markup renders as text."""
    from mmart.review import Filters

    from fake_preds import fabricate_predictions, with_rationales

    preds = fabricate_predictions(tiny_world)
    user = preds.iloc[0].user_id
    payload = PAYLOADS["script"] + PAYLOADS["img"] + PAYLOADS["svg"]
    preds = with_rationales(preds, {(user, t): payload for t in preds.title_id[preds.user_id == user]})
    preds_path = tmp_path / "preds.parquet"
    preds.to_parquet(preds_path, index=False)

    index = run_review(tiny_world, tmp_path / "review", preds=preds_path, filters=Filters(member=user),
                       progress=False).index
    got = visit(browser, index.as_uri(), PROBE)
    page = got["probe"]
    assert page["pwned"] == "undefined"
    assert (page["scripts"], page["svgs"], page["stray_imgs"], page["handlers"]) == (0, 0, 0, []), page
    assert f"Why (the model's words): {payload}" in page["text"]
    assert not got["exceptions"], got["exceptions"]
