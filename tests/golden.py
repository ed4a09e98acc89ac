"""Helpers for the golden case of the published code (tests/data; what each file holds: tests/data/README.md)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from lfpv_fast import BankDraws, LFPVNet

DATA = Path(__file__).parent / "data"


def load_case() -> dict:
    return torch.load(DATA / "model_case.pt", weights_only=True)


def original_keys() -> dict[str, list[int]]:
    return json.loads((DATA / "original_state_dict_keys.json").read_text())


def recipe_tensor(name: str, shape: list[int], seed: int) -> torch.Tensor:
    """The golden README's deterministic weight for one published state-dict entry (float64)."""
    n = math.prod(shape)
    h = sum(ord(c) for c in name)
    base = torch.sin(0.7 * torch.arange(n, dtype=torch.float64) + 0.37 * h + seed).reshape(shape)
    if name.endswith("num_batches_tracked"):
        return torch.zeros(shape, dtype=torch.int64)
    if name.endswith("running_var"):
        return 1 + 0.1 * base.abs()
    if name.endswith("running_mean"):
        return 0.1 * base
    if name.startswith("common_feature") or name.startswith("embedding"):
        return base
    if name.endswith(".bias"):
        return 0.05 * base
    if name.endswith(".weight") and ("norm" in name or len(shape) == 1):
        return 1 + 0.1 * base
    return base / math.sqrt(math.prod(shape[1:]))


def recipe_state_dict(seed: int) -> dict[str, torch.Tensor]:
    return {name: recipe_tensor(name, shape, seed) for name, shape in original_keys().items()}


def golden_net(case: dict, backend: str = "reference") -> LFPVNet:
    """The published model with the recipe weights, built in float64 end to end."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return LFPVNet.from_original_state_dict(recipe_state_dict(case["seed"]), backend=backend)
    finally:
        torch.set_default_dtype(previous)


def golden_draws(case: dict) -> BankDraws:
    d = case["train_draws"]
    return BankDraws(d["vector_pos_hw"], d["patch_pos_hw"], d["mutual_vector_partner"], d["mutual_patch_partner"])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().cpu(), b.detach().cpu()
    return ((a - b).norm() / b.norm()).item()


def fingerprint(grad: torch.Tensor) -> torch.Tensor:
    g = grad.detach().cpu().to(torch.float64).flatten()
    return torch.stack([g.norm(), (g * torch.cos(0.3 * torch.arange(g.numel(), dtype=torch.float64))).sum()])
