"""The headless-Chromium helper (tests/browser.py) itself: a clean page renders clean, and a console
error, a broken image and a network fetch are all reported."""

import base64
import io

from PIL import Image

from tests.browser import render_in_chromium


def _png_data_uri(width: int = 2, height: int = 2) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def test_clean_page_with_embedded_image(tmp_path):
    page = tmp_path / "clean.html"
    page.write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>Clean report</title></head>"
        f"<body><h1>Results</h1><img alt='dice curve' src='{_png_data_uri()}'></body></html>",
        encoding="utf-8",
    )
    result = render_in_chromium(page)
    assert result["console_errors"] == [] and result["page_errors"] == [] and result["failed_requests"] == []
    assert result["title"] == "Clean report"
    assert "Results" in result["text"]
    (image,) = result["images"]
    assert image["alt"] == "dice curve" and image["src_is_data_uri"]
    assert (image["natural_width"], image["natural_height"]) == (2, 2)
    assert result["screenshot"].startswith(b"\x89PNG\r\n\x1a\n")


def test_console_error_and_broken_image_are_reported(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text(
        "<!doctype html><html><head><title>Broken</title>"
        "<link rel='stylesheet' href='https://example.com/report.css'></head><body>"
        "<script>console.error('boom from the report')</script>"
        "<img alt='lost figure' src='missing.png'></body></html>",
        encoding="utf-8",
    )
    result = render_in_chromium(page)
    assert any("boom from the report" in e for e in result["console_errors"]), result["console_errors"]
    assert any("missing.png" in r for r in result["failed_requests"]), result["failed_requests"]
    # the network is blocked: a self-contained report must not fetch anything
    assert any(r.startswith("https://example.com/report.css") for r in result["failed_requests"])
    (image,) = result["images"]
    assert image["alt"] == "lost figure" and not image["src_is_data_uri"]
    assert image["natural_width"] == 0
