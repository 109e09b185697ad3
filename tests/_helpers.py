"""Helpers shared by test modules (tests/ is on pytest's ``pythonpath``)."""

from __future__ import annotations

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, the relative error every float comparison in the suite uses."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm()).item()
