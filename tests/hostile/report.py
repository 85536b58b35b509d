"""Every hostile case of issue 17 with its outcome now: prints the table and writes docs/HOSTILE.md.

    TRITON_INTERPRET=1 .venv/bin/python tests/hostile/report.py [--out docs/HOSTILE.md]

Builds the valid files (tiny SD15 reference model, static W8A8 with timestep groups and SmoothQuant,
and its calibration), then runs each damaged file through Load Quantized's code (model_files.load_model)
or Calibration.load, each bad name / interrupted save / policy / widget through the node code, and
classifies the outcome: clear error (an OctetError naming the file or widget), correct load (samples
bit-identical to the valid file), raw exception, silent wrong load, hang (over 60 s) or leftover file.
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)

import importlib.util  # noqa: E402


def _load(name: str, path: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_load("octet_tests_conftest", os.path.join(ROOT, "tests", "conftest.py"))  # loads the pack as comfyui_octet
_load("hostile_conftest", os.path.join(HERE, "conftest.py"))  # the host, as the tests see it

import torch  # noqa: E402

import make_files  # noqa: E402
from comfyui_octet.nodes import bridge, calibrate_nodes, model_files, sampler_nodes  # noqa: E402
from comfyui_octet.octet import OctetError, checkpoint, presets, safefile  # noqa: E402
from comfyui_octet.octet.calibration import Calibration  # noqa: E402

HANG_S = 60
ISSUE_ITEM = {  # which item of issue 17 a case belongs to
    "bias": 1, "pre_quant": 1, "input_scale": 1, "weight_scale": 1, "weight_": 1, "static_": 1, "bitflip": 1,
    "channel_absmax": 1, "counts": 1, "calls": 1, "absmax": 1, "blocks": 3, "depth": 3, "channels": 3,
    "channel_mult": 3, "heads": 3, "context": 3, "class": 4, "timestep": 4, "cal_groups": 4, "comfy_quant": 4,
    "header": 4, "unet_config": 4, "architecture": 4, "cal_": 4, "name:": 5, "mode:": 5, "nan_": 6,
    "policy": 7, "save_nan": 8, "kill": 2, "interrupt": 2,
}


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang()


def _item(name: str) -> str:
    return str(next((v for k, v in ISSUE_ITEM.items() if name.startswith(k)), "-"))


def run_case(fn, folder: str, expected_files: set) -> tuple[str, str, float]:
    """(outcome, message, seconds) of ``fn()``, which returns "load" or raises."""
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(HANG_S)
    t = time.perf_counter()
    try:
        result = fn()
        outcome, msg = result if isinstance(result, tuple) else (result, "")
    except OctetError as e:
        outcome, msg = "clear error", str(e)
    except Hang:
        outcome, msg = "hang", f"over {HANG_S} s"
    except BaseException as e:  # noqa: BLE001 - we are classifying exactly these
        outcome, msg = "raw exception", f"{type(e).__name__}: {e}"
    finally:
        signal.alarm(0)
    seconds = time.perf_counter() - t
    left = sorted(set(os.listdir(folder)) - expected_files)
    if left and outcome != "hang":
        outcome, msg = "leftover", f"left {left}; {msg}"
    return outcome, msg, seconds


def _sample(patcher, conds):
    import nodes
    pos, neg = conds
    return nodes.common_ksampler(patcher, 3, 2, 4.0, "euler", "normal", pos, neg,
                                 {"samples": torch.zeros(1, 4, 8, 8)})[0]["samples"]


def file_rows(valid: dict, work: str) -> list[dict]:
    rows = []
    reference = _sample(model_files.load_model(valid["checkpoint"]), valid["conds"])
    for kind, cases, source in (("checkpoint", make_files.checkpoint_cases(), valid["checkpoint"]),
                                ("calibration", make_files.calibration_cases(), valid["calibration"])):
        for case in cases:
            folder = tempfile.mkdtemp(dir=work)
            path = make_files.write_case(case, source, os.path.join(folder, f"{case.name}.safetensors"))

            def attempt(case=case, path=path, kind=kind):
                if kind == "calibration":
                    Calibration.load(path)
                    return "silent wrong load" if case.expect == "error" else "correct load"
                loaded = model_files.load_model(path)
                if case.expect == "error":
                    return "silent wrong load"
                same = torch.equal(_sample(loaded, valid["conds"]), reference)
                return ("correct load", "samples bit-identical to the valid file") if same else \
                    ("silent wrong load", "samples differ from the valid file")
            outcome, msg, s = run_case(attempt, folder, {os.path.basename(path)})
            if outcome == "clear error" and os.path.basename(path) not in msg:
                outcome = "unclear error"
            rows.append({"case": f"{kind}: {case.name}", "what": case.what, "expect": case.expect,
                         "outcome": outcome, "seconds": s, "message": msg, "item": _item(case.name)})
    return rows


def other_rows(valid: dict, work: str) -> list[dict]:
    rows = []

    def add(name, what, fn, folder, expected=(), item=None):
        outcome, msg, s = run_case(fn, folder, set(expected))
        rows.append({"case": name, "what": what, "expect": "error", "outcome": outcome, "seconds": s,
                     "message": msg, "item": str(item or _item(name))})

    for bad in ("", ".", "..", "x/", "   ", "a\x00b", "y" * 300, ".hidden", "../x", "/abs/x", "a\\b"):
        folder = tempfile.mkdtemp(dir=work)
        add(f"name: {bad[:20]!r}", "Save Quantized / Save Calibration filename", lambda b=bad, f=folder:
            safefile.output_path(f, b), folder, item=5)
    folder = tempfile.mkdtemp(dir=work)
    ok = safefile.output_path(folder, "x.safetensors")
    rows.append({"case": "name: 'x.safetensors'", "what": "extension typed", "expect": "load",
                 "outcome": "correct load" if ok.endswith("/x.safetensors") else "silent wrong load", "seconds": 0.0,
                 "message": os.path.basename(ok), "item": "5"})

    q = model_files.load_model(valid["checkpoint"])
    folder = tempfile.mkdtemp(dir=work)

    def umask_mode():
        old = os.umask(0o022)
        try:
            model_files.save_model(q, os.path.join(folder, "m.safetensors"))
            Calibration.load(valid["calibration"]).save(os.path.join(folder, "c.safetensors"))
        finally:
            os.umask(old)
        modes = {f: oct(os.stat(os.path.join(folder, f)).st_mode & 0o777) for f in ("m.safetensors", "c.safetensors")}
        good = set(modes.values()) == {"0o644"}
        return ("correct load" if good else "silent wrong load"), f"modes under umask 022: {modes}"
    outcome, msg, s = run_case(umask_mode, folder, {"m.safetensors", "c.safetensors", "m.report.txt", "m.report.json"})
    rows.append({"case": "mode: umask 022", "what": "saved checkpoint and calibration", "expect": "load",
                 "outcome": outcome, "seconds": s, "message": msg, "item": "5"})

    folder = tempfile.mkdtemp(dir=work)

    def save_nan():
        q2 = model_files.load_model(valid["checkpoint"])
        next(iter(bridge.quantized_layers(q2).values())).weight_scale[0, 0] = float("nan")
        model_files.save_model(q2, os.path.join(folder, "nan.safetensors"))
        return "silent wrong load"
    add("save_nan: weight_scale NaN", "Save Quantized of a model with a NaN scale", save_nan, folder)

    folder = tempfile.mkdtemp(dir=work)

    def interrupted():
        real, calls = safefile.write_chunks, []

        def chunks(f, data):
            calls.append(1)
            if len(calls) == 5:
                raise KeyboardInterrupt
            real(f, data)
        safefile.write_chunks = chunks
        try:
            checkpoint.save_parts(os.path.join(folder, "m.safetensors"), *model_files.patched_view(q), {})
        except KeyboardInterrupt:
            return ("cleaned up", "KeyboardInterrupt surfaced after the partial file was removed") if not os.listdir(folder) else \
                ("leftover", str(os.listdir(folder)))
        finally:
            safefile.write_chunks = real
        return "silent wrong load"
    add("interrupt: Ctrl+C during save", "KeyboardInterrupt mid-write", interrupted, folder)

    from test_hostile_files import SLOW_WRITER
    for sig in (signal.SIGTERM, signal.SIGKILL, "exit"):
        folder = tempfile.mkdtemp(dir=work)

        def killed(sig=sig, folder=folder):
            proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, ROOT, os.path.join(folder, "m.safetensors"),
                                     "thread" if sig == "exit" else "main"],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            try:
                proc.stdout.readline()
                if sig == "exit":
                    proc.stdin.write("\n")
                    proc.stdin.flush()
                else:
                    proc.send_signal(sig)
                proc.wait(timeout=60)
            finally:
                proc.kill()
                proc.wait()
            swept = safefile.sweep(folder)  # what the next save / start does
            how = "main thread exited while a daemon thread saved" if sig == "exit" else f"writer ended by {sig.name}"
            return ("cleaned up", f"{how}; the next save/start swept: {swept or 'nothing left'}")
        label = "main thread exits (Ctrl+C in ComfyUI)" if sig == "exit" else sig.name
        add(f"kill: {label} during save", "writer stopped mid-write", killed, folder)

    folder = tempfile.mkdtemp(dir=work)
    add("policy: 2 MB, 100k rules", "Mixed-Precision Policy rules text", lambda: presets.build_policy(
        None, rules="input_blocks.1.1.proj_in: keep\n" * 70000), folder)
    add("policy: 12k lines", "Mixed-Precision Policy rules text", lambda: presets.build_policy(
        None, rules="*.to_q: keep\n" * 12000), folder)
    add("policy: (a+)+$ regex", "catastrophic-backtracking regex", lambda: presets.build_policy(
        None, rules="re:(a+)+$: keep"), folder)

    pos, neg = valid["conds"]
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    base = dict(seed=1, steps=2, cfg=4.0, sampler_name="euler", scheduler="normal", denoise=1.0,
                float_first_steps=0, float_last_steps=0)
    for widget in ("cfg", "denoise"):
        add(f"nan_{widget}: INT8 Sampler {widget}=NaN", "widget value", lambda w=widget: sampler_nodes.Int8Sampler.execute(
            valid["quantized"], pos, neg, latent, **{**base, w: math.nan}), folder)
    import nodes
    add("nan_cfg: KSampler cfg=NaN on an INT8 model", "the host's own KSampler", lambda: nodes.common_ksampler(
        valid["quantized"], 3, 2, math.nan, "euler", "normal", pos, neg, latent), folder)
    add("nan_cfg: Calibrate cfg=NaN", "widget value", lambda: calibrate_nodes.Calibrate.execute(
        valid["model"], pos, neg, latent, 1, 2, math.nan, "euler", "normal", 2), folder)
    return rows


COUNTED = ("raw exception", "silent wrong load", "hang", "leftover", "unclear error")


def markdown(rows: list[dict]) -> str:
    counts = {k: sum(r["outcome"] == k for r in rows) for k in ("clear error", "correct load", "cleaned up") + COUNTED}
    lines = ["# Hostile and damaged input (issue 17)", "",
             "Made by `TRITON_INTERPRET=1 .venv/bin/python tests/hostile/report.py` (the same cases run as tests in",
             "`tests/hostile/test_hostile_files.py`). Damaged files come from a valid static W8A8 checkpoint (timestep",
             "groups, SmoothQuant) of the embedded tiny SD15 model and its calibration (`tests/hostile/make_files.py`);",
             "tensor edits drop the content hash, as files from other tools have none, so each check is shown alone;",
             "`bitflip_*` keep it. A correct load samples bit-identically to the valid file.", "",
             "| outcome | count |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in counts.items()]
    lines += ["", f"{len(rows)} cases; raw exceptions, silent wrong loads, hangs, leftovers: "
                  f"{sum(counts[k] for k in COUNTED)}.", "",
              "| issue item | case | what | outcome | ms | message |", "|---|---|---|---|---|---|"]
    for r in rows:
        msg = r["message"].replace("|", "\\|").replace("\n", " ")
        msg = msg if len(msg) <= 160 else msg[:157] + "..."
        lines.append(f"| {r['item']} | {r['case'].replace('|', '')} | {r['what']} | {r['outcome']} | "
                     f"{r['seconds'] * 1000:.0f} | {msg} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "HOSTILE.md"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    work = tempfile.mkdtemp(prefix="octet-hostile-")
    try:
        valid = make_files.build_valid_files(os.path.join(work, "valid"))
        rows = file_rows(valid, work) + other_rows(valid, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = markdown(rows)
    print(text)
    with open(args.out, "w") as f:
        f.write(text)
    bad = [r for r in rows if r["outcome"] in COUNTED]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
