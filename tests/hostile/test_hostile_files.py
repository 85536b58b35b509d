"""Issue 17: damaged and forged files, interrupted saves, bad names, huge policies, NaN widgets.

Every case must end in an OctetError that says what is wrong (or a correct load), leave no file
behind, and not build a model from forged sizes.
"""
import math
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import make_files
from comfyui_octet.nodes import bridge, calibrate_nodes, sampler_nodes, model_files
from comfyui_octet.octet import OctetError, checkpoint, presets, safefile
from comfyui_octet.octet.calibration import Calibration

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CKPT_CASES = {c.name: c for c in make_files.checkpoint_cases()}
CAL_CASES = {c.name: c for c in make_files.calibration_cases()}


def _sample(patcher, conds, steps=2):
    import nodes
    pos, neg = conds
    return nodes.common_ksampler(patcher, 3, steps, 4.0, "euler", "normal", pos, neg,
                                 {"samples": torch.zeros(1, 4, 8, 8)})[0]["samples"]


@pytest.fixture(scope="module")
def reference_sample(valid_files):
    return _sample(model_files.load_model(valid_files["checkpoint"]), valid_files["conds"])


@pytest.mark.parametrize("name", sorted(CKPT_CASES))
def test_damaged_checkpoint(name, valid_files, reference_sample, tmp_path):
    case = CKPT_CASES[name]
    path = make_files.write_case(case, valid_files["checkpoint"], str(tmp_path / f"{name}.safetensors"))
    if case.expect == "error":
        with pytest.raises(OctetError, match=case.match) as info:
            model_files.load_model(path)
        assert f"{name}.safetensors" in str(info.value)   # the message names the file
    else:
        loaded = model_files.load_model(path)
        assert torch.equal(_sample(loaded, valid_files["conds"]), reference_sample)
    assert os.listdir(tmp_path) == [f"{name}.safetensors"]


@pytest.mark.parametrize("name", sorted(CAL_CASES))
def test_damaged_calibration(name, valid_files, tmp_path):
    case = CAL_CASES[name]
    path = make_files.write_case(case, valid_files["calibration"], str(tmp_path / f"{name}.safetensors"))
    with pytest.raises(OctetError, match=case.match) as info:
        Calibration.load(path)
    assert f"{name}.safetensors" in str(info.value)
    assert os.listdir(tmp_path) == [f"{name}.safetensors"]


def test_valid_calibration_loads_unchanged(valid_files):
    cal = Calibration.load(valid_files["calibration"])
    assert cal.groups == 3 and len(cal.layers) > 10


def test_forged_block_count_is_refused_before_any_model_is_built(valid_files, tmp_path, monkeypatch):
    path = make_files.write_case(CKPT_CASES["blocks_8000"], valid_files["checkpoint"], str(tmp_path / "b.safetensors"))
    built = []
    monkeypatch.setattr(model_files.filecheck, "guarded_build", lambda *a: built.append(1))
    with pytest.raises(OctetError, match="claims 16000 blocks"):
        model_files.load_model(path)
    assert not built


# -- saving ------------------------------------------------------------------------------------------
def test_nan_weights_are_refused_at_save_naming_the_tensor(valid_files, tmp_path):
    q = model_files.load_model(valid_files["checkpoint"])
    layer = next(iter(bridge.quantized_layers(q).values()))
    layer.weight_scale[0, 0] = float("nan")
    with pytest.raises(OctetError, match=r"weight_scale' holds 1 NaN/inf"):
        model_files.save_model(q, str(tmp_path / "nan.safetensors"))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("name", ["", ".", "..", "x/", "   ", "a\x00b", "y" * 300, ".hidden", "a/../../b",
                                  "/abs/path", "a\\b", "a/ b", "../x", "a/./b"])
def test_bad_output_names_are_refused(name, tmp_path):
    with pytest.raises(OctetError, match="name"):
        safefile.output_path(str(tmp_path), name)
    assert os.listdir(tmp_path) == []


def test_output_names_are_normalised(tmp_path):
    root = str(tmp_path)
    assert safefile.output_path(root, "x.safetensors") == os.path.join(root, "x.safetensors")
    assert safefile.output_path(root, " octet/m ") == os.path.join(root, "octet", "m.safetensors")


def test_saved_files_follow_the_umask(valid_files, tmp_path):
    q = model_files.load_model(valid_files["checkpoint"])
    old = os.umask(0o022)
    try:
        model_files.save_model(q, str(tmp_path / "m.safetensors"))
        Calibration.load(valid_files["calibration"]).save(str(tmp_path / "c.safetensors"))
    finally:
        os.umask(old)
    for f in ("m.safetensors", "c.safetensors"):
        assert os.stat(tmp_path / f).st_mode & 0o777 == 0o644


def test_interrupt_during_save_leaves_nothing_and_the_old_file_intact(valid_files, tmp_path, monkeypatch):
    q = model_files.load_model(valid_files["checkpoint"])
    path = str(tmp_path / "m.safetensors")
    model_files.save_model(q, path)
    before = open(path, "rb").read()
    calls = []

    def interrupted(f, data):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        f.write(data)
    monkeypatch.setattr(safefile, "write_chunks", interrupted)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_parts(path, *model_files.patched_view(q), {})
    assert open(path, "rb").read() == before
    assert sorted(os.listdir(tmp_path)) == ["m.report.json", "m.report.txt", "m.safetensors"] or \
        sorted(os.listdir(tmp_path)) == ["m.safetensors"]


SLOW_WRITER = textwrap.dedent("""
    import importlib.util, os, sys, time
    root = sys.argv[1]
    spec = importlib.util.spec_from_file_location("comfyui_octet", os.path.join(root, "__init__.py"),
                                                  submodule_search_locations=[root])
    pack = importlib.util.module_from_spec(spec); sys.modules["comfyui_octet"] = pack; spec.loader.exec_module(pack)
    import torch
    from comfyui_octet.octet import safefile
    def slow(f, data):   # a write that takes a minute, back in the interpreter every 50 ms as a chunked write is:
        # a signal the kernel hands to another thread (torch starts some) runs its Python handler only when the
        # main thread next runs bytecode, so one 60 s sleep could hold SIGTERM's cleanup for the whole minute.
        print("writing", flush=True); f.write(data[:1])
        for _ in range(1200):
            time.sleep(0.05)
    safefile.write_chunks = slow
    if sys.argv[3] == "thread":   # like ComfyUI: the executor thread saves, the main thread leaves (Ctrl+C)
        import threading
        threading.Thread(target=safefile.save_atomic, args=({"w": torch.zeros(4)}, sys.argv[2], {}),
                         daemon=True).start()
        sys.stdin.readline()
        sys.exit(0)
    safefile.save_atomic({"w": torch.zeros(4)}, sys.argv[2], {})
""")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL, "exit"])
def test_killed_save_leaves_nothing_after_cleanup(sig, tmp_path):
    target = str(tmp_path / "m.safetensors")
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, ROOT, target, "thread" if sig == "exit" else "main"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        partial = [f for f in os.listdir(tmp_path) if f.startswith(safefile.PARTIAL_PREFIX)]
        assert len(partial) == 1 and str(proc.pid) in partial[0]
        if sig == "exit":
            proc.stdin.write("\n")
            proc.stdin.flush()
            assert proc.wait(timeout=60) == 0
        else:
            proc.send_signal(sig)
            assert proc.wait(timeout=60) == -sig
    finally:
        proc.kill()
        proc.wait()
    if sig != signal.SIGKILL:       # handled while saving / at exit: the writer removed its own file
        assert os.listdir(tmp_path) == []
    else:                           # nothing runs after SIGKILL: the next save or start sweeps it
        assert len(os.listdir(tmp_path)) == 1
        assert safefile.sweep(str(tmp_path)) == partial
        assert os.listdir(tmp_path) == []


def test_sweep_keeps_partial_files_of_live_writers_and_other_files(tmp_path):
    mine = tmp_path / f"{safefile.PARTIAL_PREFIX}{os.getpid()}-abc123.tmp"
    other = tmp_path / ".octet-partial-notes.txt"
    for p in (mine, other):
        p.write_bytes(b"x")
    assert safefile.sweep(str(tmp_path)) == []
    assert sorted(os.listdir(tmp_path)) == sorted([mine.name, other.name])


def test_written_file_is_read_back_exactly_by_safetensors(tmp_path):
    from safetensors.torch import load_file
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, 5, generator=g), "b": torch.randint(-128, 127, (7,), dtype=torch.int8),
               "c": torch.randn(2, generator=g).to(torch.bfloat16), "empty": torch.zeros(0, 4),
               "u": torch.tensor([1, 2, 3], dtype=torch.uint8)}
    path = str(tmp_path / "t.safetensors")
    safefile.save_atomic(tensors, path, {"k": "v"})
    back = load_file(path)
    assert set(back) == set(tensors) and all(torch.equal(back[k], tensors[k]) for k in tensors)


# -- text and widgets --------------------------------------------------------------------------------
def test_two_megabyte_policy_is_refused_before_parsing():
    with pytest.raises(OctetError, match="limit is"):
        presets.build_policy(None, rules="input_blocks.1.1.proj_in: keep\n" * 70000)
    with pytest.raises(OctetError, match="limit is"):
        presets.build_policy(None, rules="*.to_q: keep\n" * 1200)
    with pytest.raises(OctetError, match="exponential"):
        presets.build_policy(None, rules="re:(a+)+$: keep")


@pytest.mark.parametrize("widget", ["cfg", "denoise"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_int8_sampler_refuses_non_finite_widgets(widget, value, valid_files):
    args = dict(seed=1, steps=2, cfg=4.0, sampler_name="euler", scheduler="normal", denoise=1.0,
                float_first_steps=0, float_last_steps=0)
    args[widget] = value
    pos, neg = valid_files["conds"]
    with pytest.raises(OctetError, match=f"INT8 Sampler: '{widget}'"):
        sampler_nodes.Int8Sampler.execute(valid_files["quantized"], pos, neg, {"samples": torch.zeros(1, 4, 8, 8)},
                                          **args)


def test_calibrate_refuses_nan_cfg(valid_files):
    pos, neg = valid_files["conds"]
    with pytest.raises(OctetError, match="Calibrate: 'cfg'"):
        calibrate_nodes.Calibrate.execute(valid_files["model"], pos, neg, {"samples": torch.zeros(1, 4, 8, 8)}, 1, 2,
                                          math.nan, "euler", "normal", 2)


@pytest.mark.parametrize("source", ["loaded", "quantized"])
def test_stock_ksampler_refuses_nan_cfg_on_an_int8_model(source, valid_files):
    import nodes
    model = model_files.load_model(valid_files["checkpoint"]) if source == "loaded" else valid_files["quantized"]
    pos, neg = valid_files["conds"]
    with pytest.raises(OctetError, match="'cfg' is nan"):
        nodes.common_ksampler(model, 3, 2, math.nan, "euler", "normal", pos, neg, {"samples": torch.zeros(1, 4, 8, 8)})
    assert torch.isfinite(_sample(model, valid_files["conds"])).all()   # a finite cfg still samples
