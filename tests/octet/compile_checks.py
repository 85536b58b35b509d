"""The torch.compile check the compile tests share: the model traces in one graph (no break) and the compiled
model gives the eager numbers exactly."""
import torch
import torch._dynamo


def assert_compiles_as_eager(model, x):
    eager = model(x)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), eager, rtol=0, atol=0)
