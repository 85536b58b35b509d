"""What a quantization did, layer by layer: the record users read, checkpoints summarise, and the
decision table (``decision_table``, ``write_report``) written beside a saved checkpoint."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Iterable, Optional


@dataclass
class LayerRecord:
    name: str
    kind: str          # "linear" | "conv"
    params: int
    decision: str      # a mode name ("weight_only", "dynamic", "static") or "skipped"
    reason: str = ""
    bytes_before: int = 0
    bytes_after: int = 0


@dataclass
class QuantReport:
    layers: list[LayerRecord] = field(default_factory=list)

    @property
    def quantized(self) -> list[LayerRecord]:
        return [r for r in self.layers if r.decision != "skipped"]

    @property
    def skipped(self) -> list[LayerRecord]:
        return [r for r in self.layers if r.decision == "skipped"]

    @property
    def bytes_before(self) -> int:
        return sum(r.bytes_before for r in self.quantized)

    @property
    def bytes_after(self) -> int:
        return sum(r.bytes_after for r in self.quantized)

    @property
    def bf16_bytes(self) -> int:
        """What the quantized layers would weigh in bf16: the baseline users compare against."""
        return sum(2 * r.params for r in self.quantized)

    @property
    def ratio_vs_bf16(self) -> float:
        return self.bytes_after / self.bf16_bytes if self.bf16_bytes else float("nan")

    def summary(self) -> str:
        return (f"{len(self.quantized)} layers quantized, {len(self.skipped)} skipped; quantized layers "
                f"{self.bytes_before / 2**20:.2f} MiB -> {self.bytes_after / 2**20:.2f} MiB "
                f"({self.bytes_after / max(self.bytes_before, 1):.3f}x of their size in the model's own dtype, "
                f"{self.ratio_vs_bf16:.3f}x of bf16)")  # issue 15: a "vs bf16" alone misled for fp32 models

    def to_text(self, limit: int | None = None) -> str:
        rows = self.layers if limit is None else self.layers[:limit]
        width = max([len(r.name) for r in rows] + [5])
        lines = [f"{'layer':<{width}}  {'kind':<6} {'params':>10}  {'decision':<11} reason",
                 "-" * (width + 50)]
        for r in rows:
            lines.append(f"{r.name:<{width}}  {r.kind:<6} {r.params:>10}  {r.decision:<11} {r.reason}")
        if limit is not None and len(self.layers) > limit:
            lines.append(f"... {len(self.layers) - limit} more layers")
        lines.append(self.summary())
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"layers": [asdict(r) for r in self.layers]}


def decision_table(rows: Iterable[tuple]) -> str:
    """Readable table: (layer, kind, params, sensitivity dB or None, decision, reason)."""
    rows = list(rows)
    width = max([len(r[0]) for r in rows] + [5])
    lines = [f"{'layer':<{width}}  {'kind':<6} {'params':>10}  {'alone dB':>8}  {'decision':<11} reason",
             "-" * (width + 60)]
    for name, kind, params, score, decision, reason in rows:
        s = "-" if score is None else ("inf" if score == float("inf") else f"{score:.1f}")
        lines.append(f"{name:<{width}}  {kind:<6} {params:>10}  {s:>8}  {decision:<11} {reason}")
    return "\n".join(lines)


def write_report(checkpoint_path: str, layers: list[dict], policy: Optional[dict] = None,
                 header: Optional[dict] = None) -> list[str]:
    """Write ``<checkpoint>.report.txt`` (the table) and ``.report.json`` beside a checkpoint.

    ``layers``: ``QuantReport.to_dict()["layers"]``; ``policy``: ``Policy.to_dict()`` (its scores
    fill the sensitivity column). Returns the paths written. Both files are small and human-facing;
    the checkpoint itself stays self-contained (skipped layers are simply not quantized in it).
    """
    scores = (policy or {}).get("scores", {})
    rows = [(r["name"], r["kind"], r["params"], scores.get(r["name"]),
             "keep" if r["decision"] == "skipped" else r["decision"], r.get("reason", "")) for r in layers]
    kept = sum(r["params"] for r in layers if r["decision"] == "skipped")
    total = sum(r["params"] for r in layers) or 1
    head = [f"Octet quantization report for {os.path.basename(checkpoint_path)}",
            f"policy: {(policy or {}).get('name', 'none')}; {len(layers) - sum(r['decision'] == 'skipped' for r in layers)}"
            f" of {len(layers)} layers quantized; {100 * kept / total:.2f}% of parameters kept in float", ""]
    base = os.path.splitext(checkpoint_path)[0]
    paths = [base + ".report.txt", base + ".report.json"]
    with open(paths[0], "w", encoding="utf-8") as f:
        f.write("\n".join(head) + decision_table(rows) + "\n")
    with open(paths[1], "w", encoding="utf-8") as f:
        json.dump({"checkpoint": os.path.basename(checkpoint_path), "header": header or {}, "policy": policy,
                   "layers": layers}, f, indent=1, sort_keys=True)
    return paths
