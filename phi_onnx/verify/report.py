"""A verification's result: its figures and checks, as the manifest record and as a table for people."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from phi_onnx.manifest import VERIFY_TOOLS, tool_versions
from phi_onnx.verify.thresholds import Check, Thresholds


@dataclass
class VerifyResult:
    """What a verification measured, and whether every limit held."""

    folder: Path
    precision: str
    figures: dict[str, float]
    thresholds: Thresholds
    checks: list[Check]
    reference: dict[str, Any]
    inputs: dict[str, Any]
    device: str
    provider: str
    seconds: float
    files_changed_since_export: list[str] = field(default_factory=list)
    recorded: bool = False
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    @property
    def passed(self) -> bool:
        """True when every checked figure is within its limit."""
        return all(check.passed for check in self.checks)

    @property
    def failed(self) -> list[str]:
        """Names of the figures outside their limits."""
        return [check.figure for check in self.checks if not check.passed]

    def to_dict(self) -> dict[str, Any]:
        """The record written into the manifest (and printed by `--json`)."""
        return {
            "passed": self.passed,
            "failed": self.failed,
            "created": self.created,
            "precision": self.precision,
            "figures": self.figures,
            "thresholds": self.thresholds.to_dict(),
            "checks": [asdict(check) for check in self.checks],
            "reference": self.reference,
            "inputs": self.inputs,
            "device": self.device,
            "provider": self.provider,
            "tools": tool_versions(VERIFY_TOOLS),
            "seconds": round(self.seconds, 2),
            "files_changed_since_export": self.files_changed_since_export,
        }

    def summary(self) -> str:
        """Human-readable table: each figure, its limit, and the verdict."""
        limits = {check.figure: check for check in self.checks}
        against = self.reference.get("spec") or self.reference.get("path")
        if self.reference.get("kind") == "export":
            against = f"the {self.reference.get('precision') or ''} export {against}".replace("the  ", "the ")
        lines = [f"Verified {self.folder} ({self.precision}) on {self.provider} against {against}:"]
        for name, value in self.figures.items():
            check = limits.get(name)
            if check is None:
                verdict = ""
            else:
                sign = ">=" if check.bound == "min" else "<="
                verdict = f"  (limit {sign} {_limit(name, check.limit)}: {'ok' if check.passed else 'FAILED'})"
            lines.append(f"  {name:<22} {_show(name, value):>12}{verdict}")
        if self.files_changed_since_export:
            lines.append("  files changed since export: " + ", ".join(self.files_changed_since_export))
        if self.passed:
            lines.append("PASSED")
        else:
            lines.append("FAILED: " + "; ".join(
                f"{c.figure} {_show(c.figure, c.value)} {'<' if c.bound == 'min' else '>'} {_limit(c.figure, c.limit)}"
                for c in self.checks if not c.passed))
        return "\n".join(lines)


#: Figures shown in percent (as `build`'s summary and the README do); the record keeps the fraction.
_PERCENT = frozenset({"perplexity_change"})


def _show(name: str, value: float) -> str:
    return f"{_format(value * 100)} %" if name in _PERCENT and value == value else _format(value)


def _limit(name: str, limit: float) -> str:
    return f"{limit * 100:g} %" if name in _PERCENT else f"{limit:g}"


def _format(value: float) -> str:
    if value != value:  # NaN
        return "nan"
    return f"{value:.6g}" if abs(value) < 1e4 else f"{value:.4e}"
