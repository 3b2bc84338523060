"""Reports of flexmoe runs: Table 1, paired tests, communication, routing, cost, as Markdown
and self-contained HTML with PNG figures."""

from flexmoe.reports.build import build_report

__all__ = ["build_report"]
