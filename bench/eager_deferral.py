"""What an eager step defers and plans, in a fresh process: ``python bench/eager_deferral.py --model sd3.5-medium
--deferred 1`` (then ``--deferred 0``; one process each, since in one process a variant timed after others ran
slower on the GPU host, docs/BENCHMARKS.md eleventh session).

Quantizes the model dynamic W8A8 as bench/e2e.py does (random weights, its 1024² inputs), runs 3 warm-up and 10
timed eager steps, and prints and writes (JSON under out/eager_deferral/) the median step, how many pending inputs
(octet/deferred.py) the timed steps made per kind, the plans' backends and the speed goal's kept float bytes:
whether the eager cost rule (kernels/backends/triton_backend.py ``deferral_pays``) declined a model's deferrals.
On CPU it runs the tiny configs under TRITON_INTERPRET=1 (a smoke test)."""
import argparse
import collections
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2e  # noqa: E402
from e2e import octet_pack  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sd3.5-medium", choices=list(e2e.MODELS))
    parser.add_argument("--deferred", default="1", choices=("0", "1"), help="OCTET_DEFERRED for this process")
    parser.add_argument("--out", default=os.path.join(e2e.ROOT, "out", "eager_deferral"))
    args = parser.parse_args()
    os.environ["OCTET_DEFERRED"] = args.deferred
    import torch
    octet_pack.load(comfy=True, cpu=not torch.cuda.is_available())
    from comfyui_octet import octet
    from comfyui_octet.octet import deferred, modules

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tiny = dev.type == "cpu"
    card = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    model = e2e.build(args.model, "bf16", dev, tiny)
    x, sigma, kw = e2e.inputs(args.model, dev, tiny)
    octet.quantize_(model.diffusion_model, octet.DynamicW8A8Config())
    made = collections.Counter()
    for cls in (deferred.PendingNorm, deferred.PendingGelu, deferred.PendingRMS, deferred.PendingQK):
        def counting(c, *a, _new=cls.__new__, **k):
            made[c.__name__] += 1
            return _new(c, *a, **k)
        cls.__new__ = staticmethod(counting)
    e2e.time_steps(model, x, sigma, kw, warmup=3, iters=0)     # plans made, kernels tuned
    made.clear()
    collected = e2e.GcLog()
    times = [t * 1000 for t in e2e.time_steps(model, x, sigma, kw, warmup=0, iters=10, gc_log=collected)]
    dm = model.diffusion_model
    summary = modules.plan_summary(dm)
    row = {"model": args.model, "OCTET_DEFERRED": args.deferred, "card": card, "step_ms": statistics.median(times),
           "pending_per_step": {k: v / len(times) for k, v in made.items()},
           "plan_backends": dict(collections.Counter(b for layer in summary["layers"].values()
                                                     for b in layer["backends"])),
           "kept_bytes": summary["extra_bytes"], "versions": {"torch": torch.__version__},
           # Which layers the eager plans keep in bf16, by name (and their weight's [N, K]): what the cost model chose.
           "layer_backends": {name: [layer["backends"], list(dm.get_submodule(name).weight.shape[:2])]
                              for name, layer in summary["layers"].items()},
           "gc_collections": collected.count, "gc_ms_per_step": collected.ms_per_step(len(times))}
    print(f"[{card}] {json.dumps({k: v for k, v in row.items() if k != 'layer_backends'})}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{args.model}_deferred{args.deferred}.json"), "w") as f:
        json.dump(row, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
