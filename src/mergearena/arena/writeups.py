"""Write-ups: what a team attaches to a submission for the creative track, Markdown or PDF.

Both come from teams, so neither is trusted. Markdown is rendered with raw HTML off (markdown-it,
CommonMark): a ``<script>`` or ``<img onerror>`` in it shows as text, and links keep only safe
schemes (no ``javascript:``). The pages that show it also forbid every script by their
Content-Security-Policy. A PDF is never rendered by the arena: it is served as a download, in a
sandbox (``Content-Security-Policy: sandbox``), so a viewer's scripts cannot run in its origin.
"""

from __future__ import annotations

from dataclasses import dataclass

from markdown_it import MarkdownIt

from mergearena.errors import SubmissionError

MAX_WRITEUP_BYTES = 4 * 2**20
MARKDOWN_SUFFIXES = (".md", ".markdown")
PDF_SUFFIXES = (".pdf",)
FORMATS = ("markdown", "pdf")
_MARKDOWN = MarkdownIt("commonmark", {"html": False, "linkify": False})


@dataclass(frozen=True)
class CheckedWriteup:
    format: str  # one of FORMATS
    title: str | None  # a Markdown write-up's first heading


def check_writeup(file_name: str, content: bytes) -> CheckedWriteup:
    """Refuse what cannot be a write-up, naming what is wrong; returns its format and title."""
    suffix = "." + file_name.rsplit(".", 1)[-1].lower() if "." in file_name else ""
    accepted = ", ".join(MARKDOWN_SUFFIXES + PDF_SUFFIXES)
    if suffix not in MARKDOWN_SUFFIXES + PDF_SUFFIXES:
        raise SubmissionError(f"a write-up is Markdown or PDF ({accepted}); got {file_name!r}")
    if len(content) > MAX_WRITEUP_BYTES:
        raise SubmissionError(
            f"the write-up is {len(content)} bytes; at most {MAX_WRITEUP_BYTES} are accepted "
            "(link large figures from it, or shrink the PDF)"
        )
    if not content.strip():
        raise SubmissionError(f"the write-up {file_name!r} is empty")
    if suffix in PDF_SUFFIXES:
        if not content.startswith(b"%PDF-"):
            raise SubmissionError(
                f"{file_name!r} is named .pdf but does not start like a PDF (%PDF-); "
                "export it as PDF again"
            )
        return CheckedWriteup("pdf", None)
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as error:
        line = content[: error.start].count(b"\n") + 1
        raise SubmissionError(
            f"the write-up is not UTF-8 text: byte {content[error.start]:#04x} on line {line}; "
            "save it as UTF-8"
        ) from None
    if "\x00" in text:
        raise SubmissionError("the write-up holds NUL characters; is it really Markdown?")
    return CheckedWriteup("markdown", _first_heading(text))


def _first_heading(text: str) -> str | None:
    tokens = _MARKDOWN.parse(text)
    for opening, inline in zip(tokens, tokens[1:], strict=False):
        if opening.type == "heading_open":
            words = "".join(
                child.content for child in inline.children or [] if child.type in _TITLE_TOKENS
            ).split()
            if words:
                return " ".join(words)[:200]
    return None


_TITLE_TOKENS = ("text", "code_inline")  # a heading's words, without its emphasis marks


def render_markdown(text: str) -> str:
    """HTML for a Markdown write-up: raw HTML escaped, unsafe link schemes left as text."""
    return _MARKDOWN.render(text)
