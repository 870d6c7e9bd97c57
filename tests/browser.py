"""Open a self-contained HTML file in headless Chromium (the system browser, driven by playwright) and
report what a reader would see: console errors, uncaught exceptions, failed requests, the images with
their decoded sizes, the title and text, and a full-page screenshot.

A self-contained report needs nothing but its own file: every request that is not ``file:`` or
``data:`` is aborted, so a reference to the network shows up in ``failed_requests``."""

import os
import shutil
from pathlib import Path

#: flags known to work headless, as root, without a GPU and without network access
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

# every <img>: alt text, decoded size (0 x 0 when it failed to load) and whether it is embedded
_IMAGES_JS = """els => els.map(e => ({
    alt: e.alt,
    src: e.getAttribute('src') || '',
    natural_width: e.naturalWidth,
    natural_height: e.naturalHeight,
    src_is_data_uri: e.currentSrc.startsWith('data:') || (e.getAttribute('src') || '').startsWith('data:'),
}))"""


def find_chromium() -> str:
    """The Chromium executable: ``$CHROMIUM``, else ``chromium`` on PATH, else /usr/bin/chromium."""
    for candidate in (os.environ.get("CHROMIUM"), shutil.which("chromium"), "/usr/bin/chromium"):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise RuntimeError(
        "Chromium not found (checked $CHROMIUM, chromium on PATH and /usr/bin/chromium): run ./install.sh, "
        "which installs Debian's chromium package, or set CHROMIUM=/path/to/chromium"
    )


def _is_local(url: str) -> bool:
    return url.startswith(("file:", "data:", "blob:", "about:"))


def render_in_chromium(html_path: str | os.PathLike, timeout_s: float = 60.0) -> dict:
    """Open ``html_path`` via its ``file://`` URL, wait for the load event, and return a dict:

    - ``console_errors``: text of every console message of type error (includes Chromium's own
      "Failed to load resource" lines)
    - ``page_errors``: uncaught exceptions
    - ``failed_requests``: ``"<url> <reason>"`` for each request that failed, including every
      non-local request, which is aborted
    - ``images``: one dict per ``<img>`` with ``alt``, ``src`` (the attribute, a data URI cut to 40
      characters), ``natural_width``, ``natural_height`` (0 when it did not load) and ``src_is_data_uri``
    - ``title``, ``text`` (the body's inner text)
    - ``screenshot``: PNG bytes of the full page, for a failing test to save
    """
    from playwright.sync_api import sync_playwright  # the dev extra; imported here so collection works without it

    executable = find_chromium()
    url = Path(html_path).resolve().as_uri()
    timeout_ms = timeout_s * 1000
    console_errors: list[str] = []
    page_errors: list[str] = []
    failed_requests: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS, timeout=timeout_ms)
        try:
            page = browser.new_page()
            page.set_default_timeout(timeout_ms)
            page.on("console", lambda msg: console_errors.append(msg.text) if msg.type == "error" else None)
            page.on("pageerror", lambda exc: page_errors.append(f"{exc.name or 'Error'}: {exc.message}"))
            page.on("requestfailed", lambda req: failed_requests.append(f"{req.url} {req.failure}"))
            page.route(lambda u: not _is_local(u), lambda route: route.abort("blockedbyclient"))
            page.goto(url, wait_until="load")
            images = page.eval_on_selector_all("img", _IMAGES_JS)
            for image in images:
                if image["src"].startswith("data:"):
                    image["src"] = image["src"][:40] + "..."
            title = page.title()
            text = page.evaluate("() => document.body ? document.body.innerText : ''")
            screenshot = page.screenshot(full_page=True, type="png")
        finally:
            browser.close()
    return {
        "console_errors": console_errors,
        "page_errors": page_errors,
        "failed_requests": failed_requests,
        "images": images,
        "title": title,
        "text": text,
        "screenshot": screenshot,
    }
