"""Captions of every figure and table, one reStructuredText file each.

Snakemake's report (``report(..., caption=caption_path(name))``) renders them as they are; the
self-contained HTML report shows the same text (:func:`caption_text`), so the two never disagree.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

HERE = Path(__file__).parent

__all__ = ["caption_path", "caption_text"]


def caption_path(name: str) -> str:
    """Absolute path of caption file ``name`` (for Snakemake's ``report()``)."""
    path = HERE / name
    if not path.is_file():
        raise FileNotFoundError(f"no caption file {name} in {HERE}")
    return str(path)


@cache
def caption_text(name: str) -> str:
    """The caption as one paragraph of plain text: reStructuredText's inline markup removed."""
    text = (HERE / name).read_text(encoding="utf-8")
    text = re.sub(r"\*\*(.+?)\*\*|\*(.+?)\*", lambda m: m.group(1) or m.group(2), text)  # emphasis
    text = re.sub(r"``(.+?)``", r"\1", text)  # literals
    text = re.sub(r"`([^`<]+?)\s*<[^>]+>`_", r"\1", text)  # links
    return " ".join(text.split())
