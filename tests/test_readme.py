"""The README is a product page whose numbers come from committed result files."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme() -> str:
    return (ROOT / "README.md").read_text(encoding="utf-8")


def test_readme_is_short() -> None:
    assert len(_readme().splitlines()) <= 250


def test_headline_table_equals_the_committed_main_job_file() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from main_job import readme_table

    payload = json.loads((ROOT / "benchmarks/results/main-job.json").read_text())
    assert readme_table(payload) in _readme()


def test_every_linked_file_exists() -> None:
    links = re.findall(r"\]\(((?:benchmarks|docs|examples|dsv|tasks|flows|tests)/[^)#]+)\)", _readme())
    assert links, "the README links its evidence"
    for page in [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), ROOT / "benchmarks" / "README.md"]:
        if not page.exists():
            continue
        for link in re.findall(r"\]\(([^)#:]+\.(?:md|py|json|png|yaml))\)", page.read_text(encoding="utf-8")):
            assert (page.parent / link).resolve().exists(), f"{page.relative_to(ROOT)} links {link}, which does not exist"
