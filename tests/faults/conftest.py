"""Fault tests: real aggregator and agent processes, killed, cut off and restarted on loopback.

This directory is on sys.path (pytest's rootdir-relative import puts it there) and on the
processes' PYTHONPATH, so they load `fault_engines:FaultEngine` and
`fault_strategies:SlowFedAvg`; the scenarios themselves live in `fault_scenarios.py`, which
bench/faults.py runs too.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)
