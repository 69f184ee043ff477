"""Load pages of a built book in headless Chromium, offline, the way a reader's browser does.

Chromium is driven through the DevTools protocol (a websocket, with ``websocket-client``):
every console message, uncaught exception and request the page makes is recorded, so a test
can require no errors and no request leaving the book.  Also a command to look at pages::

    python tests/headless.py _build/book shots/   # one PNG per page of the book

Chromium's own background traffic is switched off by its flags; a page that still tries the
network (a CDN) shows up in :attr:`Page.requests`.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--window-size=1280,900", "--remote-debugging-port=0"]
LOCAL_SCHEMES = ("file:", "data:", "blob:", "about:")


def chromium() -> str | None:
    """The Chromium (or Chrome) executable, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


@dataclass
class Page:
    """What loading one URL produced."""

    url: str
    errors: list[str] = field(default_factory=list)     # console errors and exceptions
    requests: list[str] = field(default_factory=list)   # every URL the page asked for
    facts: dict = field(default_factory=dict)           # what :data:`INSPECT` returned

    @property
    def remote_requests(self) -> list[str]:
        return [u for u in self.requests if not u.startswith(LOCAL_SCHEMES)]


# Run in the page once it has loaded and MathJax has typeset it.
INSPECT = r"""
(async () => {
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
    await MathJax.startup.promise;
  }
  const skip = 'pre, code, script, style, textarea, mjx-container, .highlight';
  const raw = [];
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    if (node.parentElement.closest(skip)) continue;
    const text = node.textContent;
    if (/\\\(|\\\[|\$\$|\$[^$\s][^$]*\$|\\frac|\\mathrm|\\left/.test(text)) raw.push(text.trim().slice(0, 120));
  }
  const math = [...document.querySelectorAll('.math')];
  return {
    title: document.title,
    mathjax: window.MathJax && MathJax.version ? MathJax.version : null,
    mathjax_scripts: [...document.scripts].map(s => s.src).filter(s => /mathjax/i.test(s)),
    math_nodes: math.length,
    math_rendered: math.filter(e => e.querySelector('mjx-container')).length,
    math_errors: document.querySelectorAll('mjx-merror').length,
    raw_tex: raw,
    images: [...document.images].map(i => ({src: i.src, ok: i.complete && i.naturalWidth > 0})),
    links: [...document.querySelectorAll('a[href]')].map(a => a.href),
    term_links: [...document.querySelectorAll('a.reference[href*="glossary.html#term-"]')]
                  .map(a => a.href),
  };
})()
"""


class Browser:
    """One headless Chromium with one tab, driven over the DevTools protocol."""

    def __init__(self, executable: str | None = None, timeout: float = 60.0):
        import websocket  # websocket-client

        self.executable = executable or chromium()
        if self.executable is None:
            raise FileNotFoundError("no chromium executable on PATH")
        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="book-chromium-")
        self.process = subprocess.Popen(
            [self.executable, *FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = Path(self.profile) / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while not (port_file.is_file() and len(port_file.read_text().split()) >= 2):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError("Chromium did not start its DevTools endpoint")
            time.sleep(0.1)
        port, path = port_file.read_text().split()[:2]
        self.ws = websocket.create_connection(f"ws://127.0.0.1:{port}{path}", timeout=timeout,
                                              suppress_origin=True)
        self.next_id = 0
        self.events: list[dict] = []
        self._seen = 0
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target,
                                 flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable", session=True)

    # -- the protocol ---------------------------------------------------------------------
    def call(self, method: str, session: bool = False, **params) -> dict:
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        self.ws.send(json.dumps(message))
        while True:
            reply = json.loads(self.ws.recv())
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                self.events.append(reply)

    def wait_for(self, method: str, timeout: float | None = None) -> dict:
        deadline = time.monotonic() + (timeout or self.timeout)
        for event in self.events:
            if event["method"] == method:
                return event
        try:
            while time.monotonic() < deadline:
                self.ws.settimeout(max(0.1, deadline - time.monotonic()))
                event = json.loads(self.ws.recv())
                if "method" in event:
                    self.events.append(event)
                    if event["method"] == method:
                        return event
        finally:
            self.ws.settimeout(self.timeout)
        raise TimeoutError(f"no {method} within the time limit")

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", session=True, expression=expression,
                           awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    # -- pages ----------------------------------------------------------------------------
    def load(self, url: str, settle: float = 0.3) -> Page:
        """Open ``url``, wait for it to load and for MathJax, and report what happened."""
        self.events = []
        navigation = self.call("Page.navigate", session=True, url=url)
        if "errorText" in navigation:
            raise RuntimeError(f"cannot open {url}: {navigation['errorText']}")
        if navigation.get("loaderId"):  # none when only the #fragment changed
            self.wait_for("Page.loadEventFired")
        facts = self.evaluate(INSPECT)
        time.sleep(settle)  # late console messages (scripts that run after load)
        self.call("Runtime.evaluate", session=True, expression="0")  # collect pending events
        page = Page(url, facts=facts)
        self._collect(page, self.events)
        self._seen = len(self.events)
        return page

    def more(self, page: Page) -> Page:
        """Add to ``page`` what happened since it loaded (scripts that ran later)."""
        self.call("Runtime.evaluate", session=True, expression="0")
        self._collect(page, self.events[self._seen:])
        self._seen = len(self.events)
        return page

    def _collect(self, page: Page, events: list[dict]) -> None:
        for event in events:
            method, params = event["method"], event.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error",
                                                                                "assert"):
                text = " ".join(str(a.get("value", a.get("description", "")))
                                for a in params.get("args", []))
                page.errors.append(f"console.{params['type']}: {text}")
            elif method == "Runtime.exceptionThrown":
                details = params.get("exceptionDetails", {})
                text = details.get("exception", {}).get("description") or details.get("text")
                page.errors.append(f"uncaught: {text}")
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                entry = params["entry"]
                page.errors.append(f"{entry.get('source')}: {entry.get('text')} "
                                   f"{entry.get('url', '')}".strip())
            elif method == "Network.requestWillBeSent":
                page.requests.append(params["request"]["url"])

    def poll(self, expression: str, timeout: float = 20.0):
        """Evaluate ``expression`` until it is truthy; returns its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value or time.monotonic() > deadline:
                return value
            time.sleep(0.2)

    def screenshot(self, path: str | os.PathLike, full_page: bool = True,
                   max_height: int = 8000) -> None:
        """A PNG of the page; the whole page (up to ``max_height`` pixels) by default."""
        if full_page:
            metrics = self.call("Page.getLayoutMetrics", session=True)
            size = metrics.get("cssContentSize") or metrics["contentSize"]
            self.call("Emulation.setDeviceMetricsOverride", session=True, width=1280,
                      height=min(int(size["height"]), max_height), deviceScaleFactor=1,
                      mobile=False)
            time.sleep(0.3)  # let the page lay itself out at the new size
        try:
            data = self.call("Page.captureScreenshot", session=True, format="png")["data"]
        finally:
            if full_page:
                self.call("Emulation.clearDeviceMetricsOverride", session=True)
        Path(path).write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            if getattr(self, "ws", None) is not None:
                self.ws.close()
        finally:
            if self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
            shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def pages_of(book: Path) -> list[Path]:
    """Every HTML page of a built book (not the copies of the sources)."""
    return sorted(p for p in book.rglob("*.html")
                  if not p.relative_to(book).parts[0].startswith("_static")
                  and p.relative_to(book).parts[0] != "_sources")


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__)
        return 2
    book, out = Path(argv[0]).resolve(), Path(argv[1])
    out.mkdir(parents=True, exist_ok=True)
    with Browser() as browser:
        for path in pages_of(book):
            page = browser.load(path.as_uri())
            name = path.relative_to(book).as_posix().replace("/", "__")[:-5] + ".png"
            browser.screenshot(out / name)
            print(f"{name}: {len(page.errors)} errors, {len(page.remote_requests)} remote "
                  f"requests, math {page.facts['math_rendered']}/{page.facts['math_nodes']}")
            for error in page.errors + page.remote_requests:
                print("   ", error)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
