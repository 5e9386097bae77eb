"""`Policy`: what Tune and calibration produce and Serve loads -- a method with its parameters,
a budget plan (per layer x KV head keep fractions, plus the few allocation parameters that made
it), an optional calibrator and provenance. JSON on disk, validated with pydantic; a
`PolicyStore` is a directory of `<policy_id>.json` files."""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .budget import BudgetPlan, rescale_plan
from .presses import Press, list_methods, make_press

POLICY_VERSION = 1
VALIDATION_KEYS = ("split", "n", "score", "score_ci95", "full_score", "uniform_score", "gain_vs_uniform", "gain_ci95")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class Policy(BaseModel):
    """A tuned compression policy for one model.

    method / params: a registry name and its parameters (e.g. `adakv` with scorer and alpha);
    compression_ratio: the mean fraction of context KV entries removed;
    plan: optional `BudgetPlan.to_dict()` (keep fractions [layer][kv_head]);
    allocation: the parameters the plan came from (e.g. layer_slope, head_alpha);
    calibrator: optional `to_dict()` of a calibrator (context -> largest safe ratio): the NLL-curve
    `kvray.calibration.Calibrator` or a measured one from `kvray.probe`;
    min_kept_tokens: a floor on the entries kept per KV head: a prompt whose compressed region
    has N tokens is compressed at most to `1 - min_kept_tokens / N` (short prompts are kept
    whole: compressing a 50-token prompt saves nothing and loses its facts); 0 = no floor;
    metrics: how it was chosen (the selection split's scores, Tune's, the calibrator's check);
    validation: its scores on a test split disjoint from every split it was tuned, fitted or
    chosen on (`kvray.validation.validation_record`: split, n, score, score_ci95, full_score,
    uniform_score, gain_vs_uniform, gain_ci95, ...); None for a policy written by hand;
    provenance: run id, creation time, ..."""

    model_config = ConfigDict(extra="forbid")

    policy_id: str
    model: str
    method: str
    params: dict[str, Any] = Field(default_factory=dict)
    compression_ratio: float = Field(ge=0.0, lt=1.0)
    query_aware: bool = False
    plan: dict | None = None
    allocation: dict[str, Any] = Field(default_factory=dict)
    calibrator: dict | None = None
    min_kept_tokens: int = Field(0, ge=0)
    metrics: dict[str, Any] = Field(default_factory=dict)
    validation: dict[str, Any] | None = None
    provenance: dict[str, Any] = Field(default_factory=dict)
    version: int = POLICY_VERSION

    @field_validator("policy_id")
    @classmethod
    def _check_id(cls, v: str) -> str:
        if not _ID.match(v):
            raise ValueError("policy_id must be 1-128 characters of letters, digits, '.', '_' or '-', "
                             f"starting with a letter or digit; got {v!r}")
        return v

    @field_validator("method")
    @classmethod
    def _check_method(cls, v: str) -> str:
        if v not in list_methods():
            raise ValueError(f"unknown method {v!r}; known: {', '.join(list_methods())}")
        return v

    @field_validator("plan")
    @classmethod
    def _check_plan(cls, v: dict | None) -> dict | None:
        if v is not None:
            BudgetPlan.from_dict(v)  # raises with what is wrong
        return v

    @field_validator("validation")
    @classmethod
    def _check_validation(cls, v: dict | None) -> dict | None:
        if v is not None:
            missing = [k for k in VALIDATION_KEYS if k not in v]
            if missing:
                raise ValueError(f"validation lacks {', '.join(missing)}; a validation object has "
                                 f"{', '.join(VALIDATION_KEYS)} (kvray.validation.validation_record)")
        return v

    def budget_plan(self) -> BudgetPlan | None:
        return BudgetPlan.from_dict(self.plan) if self.plan is not None else None

    def press(self, compression_ratio: float | None = None) -> Press:
        """The press this policy describes; `compression_ratio` moves the plan to another mean
        ratio keeping its shape (water-filling)."""
        plan = self.budget_plan()
        ratio = self.compression_ratio if compression_ratio is None else compression_ratio
        if plan is not None:
            if abs(ratio - plan.compression_ratio) > 1e-9:
                plan = rescale_plan(plan, ratio)
            return make_press(self.method, plan=plan, **self.params)
        return make_press(self.method, compression_ratio=ratio, **self.params)

    def ratio_for(self, n_tokens: int, compression_ratio: float | None = None) -> float:
        """The ratio to run on a compressed region of `n_tokens` tokens: the policy's (or the
        given one), lowered so that at least `min_kept_tokens` entries per head are kept."""
        ratio = self.compression_ratio if compression_ratio is None else float(compression_ratio)
        if self.min_kept_tokens and n_tokens > 0:
            ratio = min(ratio, max(0.0, 1.0 - self.min_kept_tokens / n_tokens))
        return ratio

    def press_for(self, n_tokens: int, compression_ratio: float | None = None) -> Press:
        """`press` at `ratio_for(n_tokens, compression_ratio)`: the full cache when the floor
        keeps everything."""
        ratio = self.ratio_for(n_tokens, compression_ratio)
        if ratio <= 0.0:
            return make_press("full")
        return self.press(ratio)

    def calibrator_obj(self):
        if self.calibrator is None:
            return None
        from .calibration import load_calibrator

        return load_calibrator(self.calibrator)

    def to_json(self) -> str:
        return self.model_dump_json(indent=1)

    @classmethod
    def from_json(cls, text: str, source: str = "<string>") -> "Policy":
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            raise ValueError(f"invalid policy in {source}: {exc}") from None

    def save(self, directory: str | os.PathLike) -> Path:
        """Write `<directory>/<policy_id>.json` atomically."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"{self.policy_id}.json"
        tmp = d / f".{self.policy_id}.{uuid.uuid4().hex}.tmp"
        tmp.write_text(self.to_json())
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Policy":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no policy file at {path}")
        return cls.from_json(path.read_text(), source=str(path))


def make_policy_id(model: str, method: str, compression_ratio: float, *parts: object) -> str:
    from .results import short_hash

    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{model}-{method}-r{compression_ratio:g}").strip("-.")[:100]
    return f"{stem}-{short_hash(model, method, compression_ratio, *parts)[:8]}"


class PolicyStore:
    """A directory of policy files, re-read on every call (new files appear without a restart)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)

    def ids(self) -> list[str]:
        if not self.directory.is_dir():
            return []
        return sorted(p.stem for p in self.directory.glob("*.json") if not p.name.startswith("."))

    def get(self, policy_id: str) -> Policy:
        path = self.directory / f"{policy_id}.json"
        if not _ID.match(policy_id) or not path.is_file():
            known = self.ids()
            raise KeyError(f"unknown policy {policy_id!r}; known: {', '.join(known) if known else '(none)'}")
        return Policy.load(path)

    def put(self, policy: Policy) -> Path:
        return policy.save(self.directory)

    def all(self) -> list[Policy]:
        return [self.get(i) for i in self.ids()]

    def __len__(self) -> int:
        return len(self.ids())


def policy_summary(policy: Policy) -> dict:
    """A short JSON-able view (for listings)."""
    return {"policy_id": policy.policy_id, "model": policy.model, "method": policy.method,
            "compression_ratio": policy.compression_ratio, "query_aware": policy.query_aware,
            "calibrated": policy.calibrator is not None, "metrics": policy.metrics, "validation": policy.validation,
            "allocation": policy.allocation}


__all__ = ["Policy", "PolicyStore", "make_policy_id", "policy_summary", "POLICY_VERSION"]
