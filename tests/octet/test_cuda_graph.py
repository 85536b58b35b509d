"""octet.cuda_graph: signatures and the LRU cache (no host needed); capture itself on a GPU."""
import pytest
import torch

from comfyui_octet.octet.cuda_graph import (HOST_TENSOR_LIMIT, GraphBackend, GraphCache, Unkeyable, capture, flatten,
                                             signature)

META = torch.device("meta")


def test_device_tensors_are_keyed_by_shape_dtype_device_not_value():
    a, b = torch.zeros(2, 3), torch.ones(2, 3)
    assert signature([a]) == signature([b])
    assert signature([a]) != signature([torch.zeros(3, 2)])
    assert signature([a]) != signature([a.double()])
    assert signature([1, "x", None]) != signature([2, "x", None])


def test_host_tensors_are_keyed_by_value_when_the_model_runs_elsewhere():
    """A CPU tensor reaches a GPU graph only through the host at capture: its value is the key."""
    sched = torch.tensor([14.6, 7.0, 0.0])
    assert signature([sched], META) == signature([sched.clone()], META)
    assert signature([sched], META) != signature([sched * 2], META)
    with pytest.raises(Unkeyable, match="cpu tensor of shape"):
        signature([torch.zeros(HOST_TENSOR_LIMIT + 1)], META)
    with pytest.raises(Unkeyable, match="object"):
        signature(flatten({"k": [object()]})[0])


def test_cache_evicts_least_recently_used():
    cache = GraphCache(capacity=2)
    cache.put("a", "A")
    cache.put("b", "B")
    assert cache.get("a") == "A"          # 'a' is now the most recent
    assert cache.put("c", "C") == ["B"]
    assert list(cache.graphs) == ["a", "c"] and cache.evictions == 1 and cache.captures == 3
    cache.failed["d"] = "why"
    assert cache.clear() == 2 and not cache.graphs and cache.failed == {"d": "why"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_gpu_capture_of_a_forward_that_builds_a_host_tensor_needs_the_device_as_default():
    """Wan's timestep embedding builds ``torch.arange(half)`` on the host and copies it over each call:
    a plain capture is refused; with the device as default device it captures and replays exactly."""
    device = torch.device("cuda")

    def embed(t):  # comfy/ldm/wan/model.py: sinusoidal_embedding_1d
        half = 128
        position = t.type(torch.float32)
        sinusoid = torch.outer(position, torch.pow(10000, -torch.arange(half).to(position).div(half)))
        return torch.cat([torch.cos(sinusoid), torch.sin(sinusoid)], dim=1)

    t = torch.tensor([999.0, 500.0], device=device)
    leaves, spec = flatten(((t,), {}))
    run = lambda call: embed(*call[0])  # noqa: E731
    backend = GraphBackend()
    with pytest.raises(Exception):
        capture(run, leaves, spec, device, backend)
    torch.cuda.synchronize()
    graph = capture(run, leaves, spec, device, backend, factories_on_device=True)
    for value in ([999.0, 500.0], [1.0, 250.0]):
        x = torch.tensor(value, device=device)
        torch.testing.assert_close(graph.run(flatten(((x,), {}))[0]), embed(x), rtol=0, atol=0)
    assert torch.get_default_device().type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_gpu_the_warm_up_measures_its_own_peak_not_an_earlier_larger_one():
    """An earlier 1 GiB allocation, freed, must not make a 4 MiB step look 1 GiB big (the graph step would then
    refuse to capture it on any card with less than that free)."""
    device = torch.device("cuda")
    big = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    del big
    x = torch.randn(1 << 20, device=device)
    peak = GraphBackend().warmup(lambda: x * 2, device, 2)
    assert (4 << 20) <= peak < (64 << 20), peak
