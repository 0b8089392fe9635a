"""Reporting: the result dataclasses (``Report`` and friends), baselines, number formatting
and the renderer registry (table, JSON, Markdown, HTML, JUnit, GitHub annotations)."""
