"""Cells of the CSV files a job writes (predictions, findings)."""

from __future__ import annotations


def csv_cell(text: str) -> str:
    """A text cell a spreadsheet shows as text: one starting with ``= + - @``, a tab or a
    carriage return (a formula to Excel or LibreOffice: CSV injection) gets a leading ``'``."""
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text
