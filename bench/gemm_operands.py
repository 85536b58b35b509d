# Why bench/kernels.py's "gemm" column for Wan's ffn up (M=14040, 8960x1536) read 1.22 ms while a
# once-built W8A8Gemm on random codes ran 0.36 ms: same shape, kernels.py's operands, one change at a time
import json, os, sys
import torch
sys.path.insert(0, ".")
from kernels import torch_ref
from kernels.backends import triton_gemm, triton_quant
card = torch.cuda.get_device_name()
def graph_ms(fn, reps=20):
    fn(); torch.cuda.synchronize()
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps): fn()
    g.replay(); torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(True), torch.cuda.Event(True); best = 1e9
    for _ in range(5):
        e0.record(); g.replay(); e1.record(); torch.cuda.synchronize(); best = min(best, e0.elapsed_time(e1) / reps)
    return best
m, n, k, dev, dt = 14040, 8960, 1536, "cuda", torch.bfloat16
torch.manual_seed(0)
x = torch.randn(m, k, device=dev, dtype=dt)
w = torch.randn(n, k, device=dev, dtype=dt) * 0.02
bias = torch.randn(n, device=dev, dtype=dt)
qw, ws = torch_ref.quantize_weight(w)
print("qw", qw.dtype, tuple(qw.shape), qw.stride(), "ws", ws.dtype, tuple(ws.shape), flush=True)
xq, xs = triton_quant.quantize_rows(x)
qr = torch.randint(-127, 128, (n, k), device=dev, dtype=torch.int8)
res = {}
for name, fn in [
        ("built once, kernels.py operands, bias", lambda g=triton_gemm.W8A8Gemm(qw, ws, bias): g.run(xq, xs, dt)),
        ("built once, kernels.py operands, no bias", lambda g=triton_gemm.W8A8Gemm(qw, ws, None): g.run(xq, xs, dt)),
        ("built once, random codes, no bias", lambda g=triton_gemm.W8A8Gemm(qr, ws, None): g.run(xq, xs, dt)),
        ("one-shot w8a8_gemm, kernels.py operands, bias", lambda: triton_gemm.w8a8_gemm(xq, xs, qw, ws, bias, dt)),
        ("one-shot w8a8_gemm, random codes, no bias", lambda: triton_gemm.w8a8_gemm(xq, xs, qr, ws, None, dt)),
        ("bf16 F.linear", lambda: torch.nn.functional.linear(x, w, bias))]:
    res[name] = graph_ms(fn)
    print(f"[{card}] M={m} N={n} K={k} {name}: {res[name]*1e3:.1f} us", flush=True)
print("codes |mean| x", xq.float().abs().mean().item(), "w", qw.float().abs().mean().item(), "rand", qr.float().abs().mean().item())
os.makedirs(os.environ.get("OUT", "out") + "/bench", exist_ok=True)
json.dump(dict(card=card, torch=torch.__version__, us={k_: v * 1e3 for k_, v in res.items()}),
          open(os.environ.get("OUT", "out") + "/bench/gemm_operands.json", "w"), indent=1)
