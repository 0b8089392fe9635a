"""JUnit XML: one testcase per BN layer, so CI systems list layers natively.

A layer with an error finding is a failure; warnings go to ``system-out``. Model-level
findings (``layer`` is null) form one extra testcase named ``(model)``.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

from bncheck.reporting.render.summary import num
from bncheck.reporting.report import Finding, Report


def _case(suite: ET.Element, classname: str, name: str, findings: list[Finding], details: str) -> bool:
    case = ET.SubElement(suite, "testcase", classname=classname, name=name, time="0")
    errors = [f for f in findings if f.severity == "error"]
    for finding in errors:
        failure = ET.SubElement(case, "failure", message=finding.message, type=finding.code)
        failure.text = finding.hint
    others = [f for f in findings if f.severity != "error"]
    lines = [details] + [f"{f.severity} {f.code}: {f.message} {f.hint}" for f in others]
    ET.SubElement(case, "system-out").text = "\n".join(lines)
    return bool(errors)


def render(report: Report, **_options: object) -> str:
    suite = ET.Element("testsuite", name="bncheck")
    classname = f"bncheck.{report.model.checkpoint or report.model.arch or 'model'}"
    by_layer: dict[str, list[Finding]] = {}
    for finding in report.findings:
        if finding.layer is not None:
            by_layer.setdefault(finding.layer, []).append(finding)
    failures = 0
    for layer in sorted(report.layers, key=lambda item: (item.depth is None, item.depth or 0, item.name)):
        details = (
            f"rank {layer.rank}, score {num(layer.score)}, noise floor {num(layer.noise_floor, 3)}, "
            f"mean shift {num(layer.mean_shift)}, scale ratio {num(layer.scale_ratio)}, "
            f"eval score {num(layer.eval_score)}"
        )
        failures += _case(suite, classname, layer.name or "(root)", by_layer.get(layer.name, []), details)
    model_level = [f for f in report.findings if f.layer is None]
    if model_level or not report.layers:
        failures += _case(suite, classname, "(model)", model_level, f"verdict {report.verdict}")
    suite.set("tests", str(len(suite)))
    suite.set("failures", str(failures))
    suite.set("errors", "0")
    suite.set("skipped", "0")
    ET.indent(suite)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(suite, encoding="unicode") + "\n"
