"""Results in a notebook (issue 31, part 3): Jupyter shows the HTML report (isolated in an
iframe), terminal IPython the table; the protocol methods are called as IPython calls them."""

from __future__ import annotations

import html

import torch
from test_report import make_report

import bncheck
from bncheck.reporting.render import render


class Printer:
    """What IPython's pretty printer hands ``_repr_pretty_``: ``text`` collects the output."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    def text(self, value: str) -> None:
        self.parts.append(value)


def test_a_report_shows_as_its_html_page_in_jupyter_and_as_the_table_in_ipython() -> None:
    report = make_report()
    shown = report._repr_html_()
    assert shown.startswith("<iframe srcdoc=") and shown.endswith("</iframe>")
    page = html.unescape(shown.split('srcdoc="', 1)[1].split('" title=', 1)[0])
    assert page == render(report, "html")  # the page itself, escaped once for the attribute
    printer = Printer()
    report._repr_pretty_(printer, cycle=False)
    assert printer.parts == [render(report, "table").rstrip("\n")]
    assert printer.parts[0].startswith("bncheck FAIL")


def test_fix_and_diff_results_show_too() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8)).eval()
    data = torch.randn(64, 4) * 3 + 1
    report = bncheck.analyze(model, data, batch_size=16)
    printer = Printer()
    report._repr_pretty_(printer, cycle=True)
    assert printer.parts == ["Report(...)"]  # a cycle is not rendered again
    from bncheck.curing.fix import run_fix
    from bncheck.reading.checkpoint import Checkpoint
    from bncheck.reporting.report import ModelInfo

    result = run_fix(Checkpoint(model, ModelInfo(None, None, "random-init", None, 1)), None,
                     lambda: [data[i:i + 16] for i in range(0, 64, 16)], out=None, dry_run=True, batch_size=16)
    assert "bncheck fix" in html.unescape(result._repr_html_())
    printer = Printer()
    result._repr_pretty_(printer, cycle=False)
    assert printer.parts[0].startswith("bncheck fix DRY-RUN")
