"""A second held-out domain: modern English prose from the Python documentation (Debian's ``python3.11-doc``).

The calibration text is Shakespeare; this set is never calibration text and nothing the search sees. Only the
paragraphs (``<p>``) of the tutorial, the HOWTOs and the FAQ are kept: prose, not code listings or tables.
Fetched once with ``apt-get download`` into ``$TYR_CACHE/data`` and kept as plain text.
"""

from __future__ import annotations

import html
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tyr_core.families import default_cache_dir  # noqa: E402

PACKAGE = "python3.11-doc"
SECTIONS = ("tutorial", "howto", "faq")


class _Paragraphs(HTMLParser):
    """Text of every ``<p>`` outside ``<pre>``, one paragraph per entry, whitespace collapsed."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self._depth = 0
        self._pre = 0
        self._buf: list[str] = []

    def handle_starttag(self, tag: str, attrs) -> None:
        if tag == "pre":
            self._pre += 1
        elif tag == "p":
            self._depth += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "pre":
            self._pre = max(0, self._pre - 1)
        elif tag == "p" and self._depth:
            self._depth -= 1
            text = " ".join("".join(self._buf).split())
            if len(text.split()) >= 8:  # drop captions and navigation stubs
                self.paragraphs.append(html.unescape(text))
            self._buf = []

    def handle_data(self, data: str) -> None:
        if self._depth and not self._pre:
            self._buf.append(data)


def page_text(markup: str) -> str:
    parser = _Paragraphs()
    parser.feed(markup)
    return "\n\n".join(parser.paragraphs)


def python_docs_files(cache: Path | None = None) -> list[str]:
    """Text files of the documentation's prose, one per page, fetched and converted on first use."""
    root = Path(cache or default_cache_dir()) / "data" / "python-docs"
    done = root / ".complete"
    if not done.is_file():
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(["apt-get", "download", PACKAGE], cwd=tmp, check=True, capture_output=True)
            deb = next(Path(tmp).glob(f"{PACKAGE}_*.deb"))
            subprocess.run(["dpkg-deb", "-x", str(deb), str(Path(tmp) / "x")], check=True)
            html_root = next((Path(tmp) / "x").glob("usr/share/doc/python3*/html"))
            for section in SECTIONS:
                for page in sorted((html_root / section).glob("*.html")):
                    text = page_text(page.read_text(encoding="utf-8", errors="replace"))
                    if text:
                        (root / f"{section}-{page.stem}.txt").write_text(text + "\n")
        done.write_text(PACKAGE + "\n")
    return [str(p) for p in sorted(root.glob("*.txt"))]


if __name__ == "__main__":
    files = python_docs_files()
    words = sum(len(Path(f).read_text().split()) for f in files)
    print(f'{{"files": {len(files)}, "words": {words}}}')
