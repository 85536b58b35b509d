"""octet.cuda_graph bookkeeping that needs no host: signatures and the LRU cache."""
import pytest
import torch

from comfyui_octet.octet.cuda_graph import HOST_TENSOR_LIMIT, GraphCache, Unkeyable, flatten, signature

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
