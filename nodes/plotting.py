"""Every chart Octet draws, in one place (PIL only: matplotlib is not a dependency).

Node outputs (ComfyUI IMAGE tensors [1, H, W, 3]): ``grid`` (FP | INT8 | diff), the quality/speed/size
scatter, the per-layer bar chart. Bench figures (PNG files): ``pareto_chart``, size against PSNR with
the Pareto front, used by bench/quality.py and bench/policy_quality.py.
"""
from __future__ import annotations

import math

import torch

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]


def _font():
    from PIL import ImageFont
    return ImageFont.load_default()


def grid(columns: list[torch.Tensor], labels: list[str], max_rows: int = 8, scale: int = 3) -> torch.Tensor:
    """Side-by-side grid: one column per model, one row per seed. Returns a ComfyUI IMAGE [1, H, W, 3]."""
    from PIL import Image, ImageDraw
    cols = [c[:max_rows].float().clamp(0, 1) for c in columns]
    n, _, h, w = cols[0].shape
    h, w = h * scale, w * scale
    head = 14
    canvas = Image.new("RGB", (len(cols) * (w + 4), head + n * (h + 4)), "white")
    draw = ImageDraw.Draw(canvas)
    for j, (c, label) in enumerate(zip(cols, labels)):
        draw.text((j * (w + 4) + 2, 1), label[: max(4, w // 6)], fill="black", font=_font())
        for i in range(n):
            img = c[i]
            img = img.repeat(3, 1, 1) if img.shape[0] == 1 else img[:3]
            arr = (img.permute(1, 2, 0) * 255).round().byte().numpy()
            tile = Image.fromarray(arr).resize((w, h), Image.NEAREST)
            canvas.paste(tile, (j * (w + 4), head + i * (h + 4)))
    return pil_to_image(canvas)


def pil_to_image(img) -> torch.Tensor:
    import numpy as np
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0)[None]


def quality_speed_size_chart(points: list[dict], title: str = "quality vs speed vs size") -> torch.Tensor:
    """Scatter of measured numbers: x = ms per sampling step, y = PSNR vs FP (dB; FP drawn at the top),
    disc area proportional to model size. Each point: {label, ms_per_step, psnr, size_mb}."""
    from PIL import Image, ImageDraw
    W, H, L, R, T, B = 560, 360, 60, 20, 30, 40
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    finite = [p["psnr"] for p in points if p["psnr"] is not None and math.isfinite(p["psnr"])]
    y_lo = min(finite) - 3 if finite else 0.0
    y_hi = (max(finite) + 6) if finite else 60.0
    xs = [p["ms_per_step"] for p in points]
    x_lo, x_hi = 0.0, max(xs) * 1.15 if xs else 1.0
    max_mb = max(p["size_mb"] for p in points) or 1.0

    def pos(x, y):
        return L + (x - x_lo) / (x_hi - x_lo) * (W - L - R), T + (1 - (y - y_lo) / (y_hi - y_lo)) * (H - T - B)

    d.rectangle([L, T, W - R, H - B], outline="black")
    for k in range(5):
        yv = y_lo + k * (y_hi - y_lo) / 4
        _, py = pos(x_lo, yv)
        d.text((4, py - 5), f"{yv:.1f}", fill="black", font=_font())
        xv = x_lo + k * (x_hi - x_lo) / 4
        px, _ = pos(xv, y_lo)
        d.text((px - 10, H - B + 4), f"{xv:.0f}", fill="black", font=_font())
    d.text((W // 2 - 60, H - 16), "ms per sampling step", fill="black", font=_font())
    d.text((4, 12), "PSNR vs FP (dB); disc area = size", fill="black", font=_font())
    d.text((W // 2, 4), title, fill="black", font=_font())
    palette = PALETTE
    for i, p in enumerate(points):
        y = p["psnr"] if p["psnr"] is not None and math.isfinite(p["psnr"]) else y_hi - 1.5
        px, py = pos(p["ms_per_step"], y)
        r = 4 + 14 * math.sqrt(p["size_mb"] / max_mb)
        d.ellipse([px - r, py - r, px + r, py + r], outline=palette[i % len(palette)], width=2)
        psnr_txt = "ref" if not (p["psnr"] is not None and math.isfinite(p["psnr"])) else f"{p['psnr']:.1f}dB"
        d.text((px + r + 2, py - 6), f"{p['label']} {psnr_txt} {p['size_mb']:.1f}MB", fill=palette[i % len(palette)],
               font=_font())
    return pil_to_image(img)


def bar_chart(rows: list[tuple[str, float]], title: str, unit: str) -> torch.Tensor:
    from PIL import Image, ImageDraw
    rows = rows[:24]
    W, row_h, label_w = 640, 16, 300
    H = 24 + row_h * max(len(rows), 1) + 8
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    d.text((4, 4), title, fill="black", font=_font())
    top = max((v for _, v in rows), default=1.0) or 1.0
    for i, (name, v) in enumerate(rows):
        y = 24 + i * row_h
        d.text((4, y + 2), name[-48:], fill="black", font=_font())
        d.rectangle([label_w, y + 2, label_w + (W - label_w - 90) * v / top, y + row_h - 3], fill="#1f77b4")
        d.text((W - 84, y + 2), f"{v:.3g} {unit}", fill="black", font=_font())
    return pil_to_image(img)



def pareto_front(points: list[dict], x: str = "size", y: str = "psnr") -> list[dict]:
    """Points no other point beats on both (smaller ``x``, higher ``y``), sorted by ``x``."""
    return sorted((p for p in points if not any(q[x] <= p[x] and q[y] >= p[y] and (q[x] < p[x] or q[y] > p[y])
                                                for q in points)), key=lambda p: p[x])


def pareto_chart(panels: dict[str, list[dict]], path: str, x_label: str, y_label: str) -> None:
    """One panel per title: points {x, y, label} (y = +inf drawn at the top edge), the Pareto front
    (smaller x, higher y) joined by a line, labels listed at the right. Saved as a PNG at ``path``."""
    from PIL import Image, ImageDraw
    W, H, L, R, T, B = 620, 300, 56, 250, 28, 36
    panels = {k: v for k, v in panels.items() if v}
    img = Image.new("RGB", (W, H * max(len(panels), 1)), "white")
    d = ImageDraw.Draw(img)
    for k, (title, pts) in enumerate(panels.items()):
        top = k * H
        finite = [p["y"] for p in pts if math.isfinite(p["y"])] or [0.0]
        x_lo, x_hi = min(p["x"] for p in pts) * 0.9, max(p["x"] for p in pts) * 1.05
        y_lo, y_hi = min(finite) - 2, max(finite) + 2

        def pos(xv, yv):
            yv = y_hi if not math.isfinite(yv) else yv
            return (L + (xv - x_lo) / (x_hi - x_lo + 1e-9) * (W - L - R),
                    top + T + (1 - (yv - y_lo) / (y_hi - y_lo + 1e-9)) * (H - T - B))
        d.rectangle([L, top + T, W - R, top + H - B], outline="black")
        d.text((L, top + 6), f"{title}: {y_label} against {x_label}", fill="black")
        for j in range(5):
            xv, yv = x_lo + j * (x_hi - x_lo) / 4, y_lo + j * (y_hi - y_lo) / 4
            px, _ = pos(xv, y_lo)
            _, py = pos(x_lo, yv)
            d.text((px - 12, top + H - B + 4), f"{xv:.2f}", fill="black")
            d.text((4, py - 5), f"{yv:.1f}", fill="black")
        front = pareto_front(pts, "x", "y")
        if len(front) > 1:
            d.line([pos(p["x"], p["y"]) for p in front], fill="#888888", width=2)
        for i, p in enumerate(pts):
            px, py = pos(p["x"], p["y"])
            c = PALETTE[i % len(PALETTE)]
            d.ellipse([px - 5, py - 5, px + 5, py + 5], fill=c)
            value = "inf" if not math.isfinite(p["y"]) else f"{p['y']:.1f}"
            d.text((W - R + 8, top + T + 16 * i), f"{value}  {p['label'][:38]}", fill=c)
    img.save(path)
