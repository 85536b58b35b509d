"""What a quantization did, layer by layer: the record users read and checkpoints summarise."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


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
