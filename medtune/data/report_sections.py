"""Report text: FINDINGS / IMPRESSION sections of free-text radiology reports, and the target text.

Import-light: standard library only.
"""

from __future__ import annotations

import re

from medtune.data.errors import DataError

__all__ = ["SECTIONS", "normalize_text", "parse_report_sections", "report_target", "check_section"]

SECTIONS = ("findings", "impression", "both")

_WS = re.compile(r"\s+")


def normalize_text(text: str | None) -> str:
    """Whitespace runs (line breaks included) -> one space; stripped; None -> ``""``."""
    return _WS.sub(" ", text or "").strip()


def report_target(findings: str, impression: str, section: str) -> str:
    """The target text of one report for ``section`` (whitespace-normalised)."""
    findings, impression = normalize_text(findings), normalize_text(impression)
    if section == "findings":
        return findings
    if section == "impression":
        return impression
    return " ".join(t for t in (findings, impression) if t)


def check_section(section: str) -> None:
    """Raise :class:`DataError` unless ``section`` is one of :data:`SECTIONS`."""
    if section not in SECTIONS:
        raise DataError(f"unknown report section {section!r} (expected one of {SECTIONS})")


# A header is a line start, a name, optional spaces and a colon. Findings / impression are known
# names matched in any case; any other ALL-CAPS name ("INDICATION", "WET READ") ends a section.
_TARGET_NAMES = {
    "findings": "findings",
    "finding": "findings",
    "findings and impression": "findings",
    "impression": "impression",
    "impressions": "impression",
    "conclusion": "impression",
}
_HEADER = re.compile(
    r"^[ \t]*(?P<name>(?i:findings and impression|findings?|impressions?|conclusion)"
    r"|[A-Z][A-Z &/()-]{1,40}?)[ \t]*:",
    re.MULTILINE,
)


def parse_report_sections(text: str) -> dict[str, str]:
    """FINDINGS and IMPRESSION of a free-text report (MIMIC-CXR style).

    Headers are matched at line starts: ``FINDINGS:`` / ``Findings:`` / ``IMPRESSION:`` (and
    ``CONCLUSION:``) in any case; any other all-caps ``NAME:`` (``INDICATION:``, ``COMPARISON:``,
    ``NOTIFICATION:``, ...) ends the current section. Repeated sections (an addendum) are joined in
    order. Text is whitespace-normalised.

    Returns:
        ``{"findings": str, "impression": str}`` (``""`` when a section is absent).
    """
    parts: dict[str, list[str]] = {"findings": [], "impression": []}
    matches = list(_HEADER.finditer(text))
    for n, m in enumerate(matches):
        name = _TARGET_NAMES.get(normalize_text(m.group("name")).lower())
        if name is None:
            continue
        end = matches[n + 1].start() if n + 1 < len(matches) else len(text)
        body = normalize_text(text[m.end() : end])
        if body:
            parts[name].append(body)
    return {k: " ".join(v) for k, v in parts.items()}
