"""The torch.compile check the compile tests share: the model traces in one graph (no break) and the compiled
model gives the eager numbers (exactly, unless a test says how close). Lives beside conftest.py, whose folder
pytest puts on sys.path, so every test folder imports it. Grad mode is the caller's (the host samples under
no_grad; some tests compile with autograd on)."""
import torch
import torch._dynamo


def assert_compiles_as_eager(model, x, rtol: float = 0, atol: float = 0):
    eager = model(x)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), eager, rtol=rtol, atol=atol)
    torch._dynamo.reset()
