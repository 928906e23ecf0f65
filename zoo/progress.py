"""Progress bars: tqdm on stderr, so that stdout carries only results (``--json``).

A bar appears only once its work has lasted ``DELAY`` seconds, so quick steps stay silent and
every step that takes longer shows where it is; ``quiet`` hides it altogether.
"""

from __future__ import annotations

from tqdm.auto import tqdm

DELAY = 2.0


def progress_bar(total: int, desc: str, *, quiet: bool = False, unit: str = "it",
                 leave: bool = False, delay: float | None = None, **options) -> tqdm:
    """A bar of ``total`` units described by ``desc``, shown after ``delay`` seconds (default
    ``DELAY``) unless ``quiet``; it disappears when closed unless ``leave``."""
    return tqdm(total=total, desc=desc, unit=unit, disable=quiet, leave=leave,
                delay=DELAY if delay is None else delay, dynamic_ncols=True, **options)
