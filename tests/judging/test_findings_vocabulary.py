"""One vocabulary of findings: the codes in bncheck/judging/findings.py are the codes the rules emit, the
JSON schemas allow, README's tables document and the renderers group by."""

from __future__ import annotations

import json
import re

from conftest import ROOT

from bncheck.judging.findings import CODES, SAMPLE, STALE, run_codes
from bncheck.reporting.report import STALE_CODES, schema_path

SOURCE = ROOT / "bncheck"
EMITTED = re.compile(r'Finding\(\s*"([a-z]+(?:-[a-z]+)+)",\s*"(error|warning|info)"')
ADDED = re.compile(r'add\(\s*"([a-z]+(?:-[a-z]+)+)",\s*"(error|warning|info)"')


def _emitted() -> set[tuple[str, str]]:
    found = set()
    for path in SOURCE.rglob("*.py"):
        text = path.read_text()
        found |= set(EMITTED.findall(text)) | set(ADDED.findall(text))
    return found


def test_every_code_a_rule_emits_is_defined_with_that_severity() -> None:
    emitted = _emitted()
    assert len(emitted) >= 20
    for code, severity in emitted:
        assert code in CODES, code
        assert severity in CODES[code].severities, (code, severity)


def test_the_run_schema_allows_exactly_the_run_codes() -> None:
    enum = _finding_enum(json.loads(schema_path("run").read_text()))
    assert set(enum) == set(run_codes())


def _finding_enum(schema: dict) -> list[str]:
    text = json.dumps(schema)
    match = re.search(r'"code": \{"enum": (\[[^\]]*\])', text)
    assert match, "no finding code enum in the schema"
    return json.loads(match.group(1))


def test_the_diff_schema_allows_the_diff_codes() -> None:
    enum = set(_finding_enum(json.loads(schema_path("diff").read_text())))
    assert {"stats-not-updated", "stats-moved-frozen-weights"} <= enum
    assert enum <= set(CODES)


def test_readme_documents_every_run_code_once() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Findings", 1)[1].split("\n## ", 1)[0]
    documented = re.findall(r"^\| `([a-z-]+)` \|", section, flags=re.M)
    assert sorted(documented) == sorted(run_codes())
    for code in ("stats-not-updated", "stats-moved-frozen-weights"):
        assert f"`{code}`" in readme


def test_groups_are_shared_not_copied() -> None:
    assert STALE_CODES is STALE
    assert set(STALE) == {"stale-running-stats", "pseudo-frozen", "never-updated", "unconverged-running-stats"}
    assert set(SAMPLE) == {"chance-accuracy", "unrepresentative-sample"}
    github = (SOURCE / "reporting" / "render" / "github.py").read_text()
    assert '"stale-running-stats", "pseudo-frozen"' not in github  # no private copy of the stale group
