"""Run every test that draws from the ``rng`` fixture under many run seeds (not part of CI).

CI runs one fixed seed (tests/conftest.py); this checks once, by hand, that the bounds of the random
tests hold with margin over other draws, so a bound that a real draw came near is widened (or the
test fixed) before it turns CI red.

    TRITON_INTERPRET=1 .venv/bin/python tests/seed_sweep.py --seeds 0:40 [tests/octet ...]

Prints, per failing test, the seeds it failed under, and writes a JSON summary (--json). All seeds
run in one process (imports once), one thread.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


class OnlyRandom:
    """Deselect tests that do not use the ``rng`` fixture; record failures per test."""

    def __init__(self):
        self.failures: dict[str, list[str]] = {}
        self.ran = 0

    def pytest_collection_modifyitems(self, config, items):
        keep = [i for i in items if "rng" in getattr(i, "fixturenames", ())]
        config.hook.pytest_deselected(items=[i for i in items if i not in keep])
        items[:] = keep

    def pytest_runtest_logreport(self, report):
        if report.when == "call":
            self.ran += 1
        if report.failed:
            msg = report.longreprtext.strip().splitlines()
            self.failures.setdefault(report.nodeid, []).append(next((m for m in reversed(msg) if m.startswith("E ")),
                                                                    msg[-1] if msg else ""))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="*", default=[os.path.join(HERE, "octet"), os.path.join(HERE, "kernels")])
    ap.add_argument("--seeds", default="0:20", help="start:stop (run seeds start..stop-1)")
    ap.add_argument("--json", default="", help="write the summary here")
    args = ap.parse_args()
    start, stop = (int(v) for v in args.seeds.split(":"))
    os.environ.setdefault("OCTET_TEST_THREADS", "1")
    summary = {"seeds": [start, stop], "failures": {}, "runs": 0}
    t0 = time.perf_counter()
    for seed in range(start, stop):
        os.environ["OCTET_TEST_SEED"] = str(seed)
        plugin = OnlyRandom()
        pytest.main(["-q", "-p", "no:cacheprovider", "--no-header", "-o", "console_output_style=classic",
                     "--tb=line", *args.paths], plugins=[plugin])
        summary["runs"] += plugin.ran
        for nodeid, msgs in plugin.failures.items():
            summary["failures"].setdefault(nodeid, []).append({"seed": seed, "error": msgs[-1]})
        print(f"seed {seed}: {plugin.ran} tests, {len(plugin.failures)} failed", file=sys.stderr, flush=True)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"\n{stop - start} seeds, {summary['runs']} test runs, {summary['seconds']} s")
    for nodeid, fails in sorted(summary["failures"].items()):
        print(f"FAILED {nodeid} under {len(fails)} seed(s): {[f['seed'] for f in fails]}\n    {fails[0]['error']}")
    if not summary["failures"]:
        print("every random test passed under every seed")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return 1 if summary["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
