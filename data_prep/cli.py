"""``walsh data ...`` and ``walsh bench staging`` (placeholder until the data_prep work lands)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``data`` command group to the ``walsh`` parser."""


def register_bench(bench: argparse._SubParsersAction) -> None:
    """Add ``bench staging`` to the ``walsh bench`` group."""
