"""Kill, cut and restart, N times over: does anything get lost or counted twice?

    python bench/faults.py --runs 3 [--model-mb 128] [--only kill_during_aggregation,...]

Runs the scenarios of tests/faults (real aggregator and agent processes on loopback, SIGKILL
of the aggregator during registration, mid-upload, during aggregation and during distribution
of a big model through a slow proxy; an agent killed mid-upload; an agent's connection cut
and black-holed past the round deadline; a straggler; a restart behind a balancer; the
aggregator's disk full, which needs root to mount a small tmpfs and is skipped elsewhere)
`--runs` times each, audits the store after each, and prints one JSON line:

- runs, scenario_runs, kills (aggregator SIGKILLs), agent_kills, failures (a run that did
  not recover; their messages follow);
- rounds_completed: global models 1..N committed, over all runs;
- models_lost: global rows whose blob is missing, rounds committed before a kill that are gone
  or changed after it, rounds missing in 0..N (must be 0);
- rounds_double_counted: two global rows for one round, a local model counted in two globals
  or twice in one (must be 0); bad_aggregates: a global that is not the weighted mean of
  exactly its round's local models (must be 0);
- orphaned_blobs / missing_blobs / temp_files after the final restart (must be 0);
- seconds, and per_scenario: the same counters for each scenario.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

# The fault harness (tests/faults) and the aggregator-process helper it builds on (tests).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "faults"))

import fault_scenarios
from faultkit import SURVIVAL_KEYS, NoSmallDisk

BIG = {"kill_during_distribution", "agent_killed_mid_upload"}
COUNTED = ("rounds_completed", "kills", "agent_kills", *SURVIVAL_KEYS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--model-mb", type=float, default=128.0, help="the big model's size")
    parser.add_argument("--only", default="", help="comma-separated scenario names (default: all)")
    args = parser.parse_args()
    known = fault_scenarios.SCENARIOS
    names = [n for n in args.only.split(",") if n] or list(known)
    unknown = set(names) - set(known)
    if unknown:
        parser.error(f"unknown scenarios {sorted(unknown)}; known: {list(known)}")

    totals: Counter[str] = Counter()
    per: dict[str, Counter[str]] = {n: Counter() for n in names}
    failures: list[str] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedloop-faults-") as tmp:
        for run in range(args.runs):
            for name in names:
                scenario = known[name]
                kwargs: dict[str, Any] = {"size_mb": args.model_mb} if name in BIG else {}
                root = Path(tmp) / f"{run}-{name}"
                t0 = time.perf_counter()
                try:
                    report = scenario(root, **kwargs)
                except NoSmallDisk as exc:  # disk_full mounts a tmpfs: root only
                    print(f"{name} run {run}: skipped ({exc})", file=sys.stderr)
                    per[name]["skipped"] += 1
                    continue
                except Exception as exc:  # a run that did not recover: counted, not fatal
                    failures.append(f"{name} run {run}: {type(exc).__name__}: {exc}"[:2000])
                    traceback.print_exc(file=sys.stderr)
                    per[name]["failures"] += 1
                    totals["failures"] += 1
                    continue
                for key in COUNTED:
                    per[name][key] += int(report.get(key, 0))
                    totals[key] += int(report.get(key, 0))
                per[name]["runs"] += 1
                per[name]["seconds"] += round(time.perf_counter() - t0)
                print(f"{name} run {run}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    print(
        json.dumps(
            {
                "bench": "faults",
                "runs": args.runs,
                "scenarios": len(names),
                "scenario_runs": args.runs * len(names),
                "model_mb": args.model_mb,
                **{k: totals[k] for k in ("failures", *COUNTED)},
                "seconds": round(time.perf_counter() - started, 1),
                "per_scenario": {n: dict(c) for n, c in per.items()},
                "failure_messages": failures,
            }
        )
    )


if __name__ == "__main__":
    main()
