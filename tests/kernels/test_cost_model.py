"""The Triton backend's cost model (kernels/backends/triton_backend.py): which layers AUTO puts on INT8
in an eager step (host cost counts) and in a replayed CUDA graph (GPU time alone), at real model shapes.
Pure arithmetic: no GPU needed."""
import pytest

from comfyui_octet.kernels import registry
from comfyui_octet.kernels.backends import triton_backend


def _req(m, n, k, eager=True, goal="speed", act="dynamic"):
    return registry.Request(op="linear", act=act, device="cuda", dtype="bfloat16", m=m, n=n, k=k, goal=goal,
                            eager=eager)


@pytest.mark.parametrize("name,m,n,k,eager_int8,graph_int8", [
    ("flux qkv 3072->9216, 4608 tokens", 4608, 9216, 3072, True, True),
    ("flux single linear2 15360->3072", 4608, 3072, 15360, True, True),
    # One row reads the weight and does little else: INT8 reads half the bytes, and the speed goal would
    # otherwise keep a bf16 copy of the biggest layers (Flux's modulations): INT8 in both modes.
    ("flux modulation, one row", 1, 18432, 3072, True, True),
    ("flux text-stream qkv, 512 tokens", 512, 9216, 3072, True, True),
    # SD3.5-medium at 1024² (4096 + 333 tokens): the layer's own GPU work is longer than a launch, so GPU
    # time decides in both modes.
    ("sd3.5 qkv 1536->4608", 4429, 4608, 1536, True, True),
    # N = K = 1536: the activation's quantization pass costs what the INT8 GEMM saves, even in a graph.
    ("sd3.5 proj 1536->1536", 4429, 1536, 1536, False, False),
    ("sdxl attn 640->640, 4096 tokens", 4096, 640, 640, False, False),
    # Launch-bound (a few us of GPU work): eager, cuBLAS's one launch beats INT8's two; a graph has no
    # launches, and there INT8's GPU time wins.
    ("64 rows, 1280->10240", 64, 10240, 1280, False, True),
])
def test_int8_where_it_saves_time_in_that_mode(name, m, n, k, eager_int8, graph_int8):
    assert triton_backend.int8_pays(_req(m, n, k)) is eager_int8, name
    assert triton_backend.int8_pays(_req(m, n, k, eager=False)) is graph_int8, name


@pytest.mark.parametrize("name,m,n,k,eager_defers", [
    # The consumer's GEMM covers the deferral's host time: the saved float pass shows.
    ("flux qkv 3072->9216, 4608 tokens", 4608, 9216, 3072, True),
    ("flux single linear2 15360->3072", 4608, 3072, 15360, True),
    # Too short: the step would wait for the host (SD3.5 measured 50.6 vs 38.0 ms per eager step).
    ("flux text-stream qkv, 512 tokens", 512, 9216, 3072, False),
    ("sd3.5 qkv 1536->4608", 4429, 4608, 1536, False),
    ("sd3.5 fc1 1536->6144", 4429, 6144, 1536, False),
])
def test_eager_calls_take_a_deferred_input_only_where_the_gemm_hides_its_host_time(name, m, n, k, eager_defers):
    assert triton_backend.deferral_pays(_req(m, n, k)) is eager_defers, name
    assert triton_backend.deferral_pays(_req(m, n, k, eager=False)) is True, name       # a replay: no host time
    cpu = registry.Request(**{**_req(m, n, k).__dict__, "device": "cpu"})
    assert triton_backend.deferral_pays(cpu) is True, name                              # the interpreter's tests


def test_octet_eager_deferral_overrides_the_eager_estimate_only(monkeypatch):
    """OCTET_EAGER_DEFERRAL=1 defers SD3.5's 4096x1536x1536 eager layers (a GPU-bound host), =0 none of Flux's;
    replays and CPU defer whatever it says (the switch is about an eager step's host time)."""
    small, large = _req(4429, 1536, 1536), _req(4608, 9216, 3072)
    assert not triton_backend.deferral_pays(small) and triton_backend.deferral_pays(large)
    monkeypatch.setenv("OCTET_EAGER_DEFERRAL", "1")
    assert triton_backend.deferral_pays(small) and triton_backend.deferral_pays(large)
    monkeypatch.setenv("OCTET_EAGER_DEFERRAL", "0")
    assert not triton_backend.deferral_pays(small) and not triton_backend.deferral_pays(large)
    assert triton_backend.deferral_pays(_req(4429, 1536, 1536, eager=False))


def test_speed_goal_float_path_pays_no_dequantization():
    # The speed goal keeps a float weight, the memory goal dequantizes it per call: the latter's float
    # path is dearer, so INT8 wins more often under the memory goal.
    m, n, k = 4096, 1536, 1536
    kept = triton_backend.estimated_seconds("float", m, n, k, eager=False, kept=True)
    per_call = triton_backend.estimated_seconds("float", m, n, k, eager=False)
    assert per_call == pytest.approx(kept + 23.0 * n * k / triton_backend._BANDWIDTH)
    assert triton_backend.estimated_seconds("float", 16, 64, 64) == triton_backend._HOST_S["float"]
    assert triton_backend.estimated_seconds("float", 16, 64, 64, eager=False) < 1e-7


def test_decline_reason_names_the_mode():
    eager = triton_backend.declines(_req(64, 10240, 1280))
    assert eager is not None and "eager step" in eager
    assert triton_backend.declines(_req(64, 10240, 1280, eager=False)) is None
