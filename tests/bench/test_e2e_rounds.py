"""bench/e2e.py --rounds: the merged row of each (variant, mode) is the median over the rounds, in the
requested variant order, with every round's value kept; a variant that failed in every round keeps its error."""
from __future__ import annotations

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _e2e():
    spec = importlib.util.spec_from_file_location("bench_e2e", os.path.join(ROOT, "bench", "e2e.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rounds_merge_to_the_median_in_requested_order():
    e2e = _e2e()
    measured = [  # round 0 in order, round 1 reversed, a third round in order again
        {"variant": "bf16", "mode": "eager", "step_ms": 50.0, "weight_bytes": 10, "round": 0},
        {"variant": "octet_dynamic", "mode": "eager", "step_ms": 90.0, "round": 0},
        {"variant": "octet_dynamic", "mode": "graph", "step_ms": 20.0, "round": 0},
        {"variant": "octet_dynamic", "mode": "eager", "step_ms": 60.0, "round": 1},
        {"variant": "octet_dynamic", "mode": "graph", "step_ms": 21.0, "round": 1},
        {"variant": "bf16", "mode": "eager", "step_ms": 46.0, "round": 1},
        {"variant": "bf16", "mode": "eager", "step_ms": 48.0, "round": 2},
        {"variant": "octet_dynamic", "mode": "eager", "step_ms": 62.0, "round": 2},
        {"variant": "octet_static", "error": "RuntimeError: boom", "round": 0},
        {"variant": "octet_dynamic", "mode": "graph", "error": "RuntimeError: capture", "round": 2},
    ]
    rows = e2e.merge_rounds(measured, ["bf16", "octet_dynamic", "octet_static"])
    assert [(r["variant"], r.get("mode")) for r in rows] == [
        ("bf16", "eager"), ("octet_dynamic", "eager"), ("octet_dynamic", "graph"), ("octet_static", None)]
    bf16, dyn, graph, static = rows
    assert bf16["step_ms"] == 48.0 and bf16["step_ms_rounds"] == [50.0, 46.0, 48.0] and bf16["weight_bytes"] == 10
    assert dyn["step_ms"] == 62.0 and dyn["step_ms_rounds"] == [90.0, 60.0, 62.0]
    assert graph["step_ms"] == 20.5 and graph["step_ms_rounds"] == [20.0, 21.0]
    assert static["error"] == "RuntimeError: boom" and "step_ms" not in static
    assert all("round" not in r for r in rows[:3])


def test_one_round_leaves_rows_as_measured():
    e2e = _e2e()
    measured = [{"variant": "bf16", "mode": "eager", "step_ms": 50.0, "round": 0}]
    (row,) = e2e.merge_rounds(measured, ["bf16"])
    assert row["step_ms"] == 50.0 and "step_ms_rounds" not in row and "round" not in row


def test_compile_rows_sort_with_their_variant():
    """A compile row is named "<variant>+compile(<mode>)" (the Flux call of 2026-12-03 died here with a
    ValueError after its bf16 compile row, losing the call's rows)."""
    e2e = _e2e()
    measured = [
        {"variant": "bf16", "mode": "eager", "step_ms": 167.0, "round": 0},
        {"variant": "bf16+compile(default)", "mode": "compile", "step_ms": 135.0, "round": 0},
        {"variant": "octet_dynamic", "mode": "eager", "step_ms": 120.0, "round": 0},
        {"variant": "octet_dynamic+compile(default)", "mode": "compile", "step_ms": 108.0, "round": 0},
    ]
    rows = e2e.merge_rounds(measured, ["bf16", "octet_dynamic"])
    assert [(r["variant"], r["step_ms"]) for r in rows] == [
        ("bf16", 167.0), ("bf16+compile(default)", 135.0), ("octet_dynamic", 120.0),
        ("octet_dynamic+compile(default)", 108.0)]


def test_host_times_merge_to_their_median_and_show_in_the_table():
    e2e = _e2e()
    measured = [{"model": "sdxl", "variant": "bf16", "mode": "eager", "step_ms": s, "host_issue_ms": s - 1,
                 "host_cpu_ms": c, "gc_ms_per_step": g, "weight_bytes": 10, "round": r}
                for r, (s, c, g) in enumerate([(50.0, 48.0, 0.0), (70.0, 69.0, 9.5), (52.0, 51.0, 0.25)])]
    (row,) = e2e.merge_rounds(measured, ["bf16"])
    assert row["host_cpu_ms"] == 51.0 and row["host_cpu_ms_rounds"] == [48.0, 69.0, 51.0]
    assert row["host_issue_ms"] == 51.0
    assert row["gc_ms_per_step"] == 0.25 and row["gc_ms_per_step_rounds"] == [0.0, 9.5, 0.25]
    table = e2e.markdown([row], "header")
    assert table.splitlines()[-1].endswith("| 51.0 | 0.25 |")       # host CPU ms, GC ms per step
    assert len(table.splitlines()[2].split("|")) == len(table.splitlines()[-1].split("|"))


def test_gc_log_counts_the_collections_made_while_installed():
    import gc
    e2e = _e2e()
    with e2e.GcLog() as log:
        gc.collect()          # a full collection
        gc.collect(0)
    assert log.count[2] >= 1 and log.count[0] >= 1 and log.seconds[2] > 0
    counted = list(log.count)
    gc.collect()              # after: not counted
    assert log.count == counted and log._callback not in gc.callbacks


def test_time_steps_splits_this_threads_cpu_from_the_process():
    """A thread that spins while the step runs counts in the process's CPU time and not in ``main_cpu``:
    the split that tells a step's own Python from other threads' work."""
    import threading
    import time
    e2e = _e2e()
    stop = threading.Event()

    class Model:   # a "step" that sleeps 100 ms: no CPU of its own
        def apply_model(self, x, sigma, **kw):
            time.sleep(0.1)

    def spin():
        while not stop.is_set():
            pass

    worker = threading.Thread(target=spin)
    worker.start()
    try:
        cpu, main_cpu = [], []
        times = e2e.time_steps(Model(), None, None, {}, 0, 2, cpu=cpu, main_cpu=main_cpu)
    finally:
        stop.set()
        worker.join()
    assert len(times) == len(cpu) == len(main_cpu) == 2
    assert max(main_cpu) < 0.01                       # the sleeping step used (almost) no CPU itself
    assert min(cpu) > 0.015                           # the spinning thread did, during those 100 ms (a loaded CI
    #                                                   core still gives it far more than 15 ms)


def test_a_compiled_graph_step_is_compared_with_compiled_bf16_and_bf16s_compiled_graph_step():
    """``--modes compile_graph``: issue 13's compiled target is against compiled bf16, so that is its "vs bf16";
    "vs bf16 graph" is bf16 through the same compiled graph step."""
    e2e = _e2e()
    rows = [
        {"model": "flux-dev", "variant": "bf16", "mode": "eager", "step_ms": 156.0, "weight_bytes": 4},
        {"model": "flux-dev", "variant": "bf16+compile(default)", "mode": "compile", "step_ms": 140.0,
         "weight_bytes": 4},
        {"model": "flux-dev", "variant": "bf16+compile(default)", "mode": "compile_graph", "step_ms": 137.0,
         "weight_bytes": 4},
        {"model": "flux-dev", "variant": "octet_dynamic+compile(default)", "mode": "compile_graph", "step_ms": 100.0,
         "weight_bytes": 2},
    ]
    table = e2e.markdown(rows, "header").splitlines()
    octet_row = next(line for line in table if "octet_dynamic" in line).split("|")
    assert [c.strip() for c in octet_row[3:7]] == ["compile_graph", "100.0", "1.40x", "1.37x"]
    assert octet_row[8].strip() == "0.500x"
