"""bench/budget_allocation.py's analysis on slots whose best allocation is known."""
import importlib.util
import pathlib

import pytest


def _module():
    path = pathlib.Path(__file__).resolve().parents[1] / "bench" / "budget_allocation.py"
    spec = importlib.util.spec_from_file_location("budget_allocation", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_best_allocation_moves_budget_to_the_slot_that_needs_it():
    # two slots, scales 0.5 / 1 / 2 reading 0.05 / 0.1 / 0.15: slot 0 is exact from 0.5 on, slot 1 only at 2
    slot = lambda errs, pred: {"read": {"0.5": 0.05, "1.0": 0.1, "2.0": 0.15},
                               "errors": {"0.5": [errs[0]], "1.0": [errs[1]], "2.0": [errs[2]]},
                               "predictors": {"p": pred}}
    doc = {"scales": [0.5, 1.0, 2.0], "slots": [slot((0.0, 0.0, 0.0), 1.0), slot((0.9, 0.5, 0.0), 4.0)]}
    rows = {name: (r, m, p) for name, r, m, p in _module().analyse(doc)}
    assert rows["uniform x1"][0] == pytest.approx(0.1)
    assert rows["uniform x1"][2] == pytest.approx(0.5, abs=0.01)
    r, _, p99 = rows["best allocation (knows the errors)"]
    assert r == pytest.approx(0.1) and p99 == pytest.approx(0.0)         # slot 0 at 0.5, slot 1 at 2
    r, _, p99 = rows["by p, alpha 1"]                                    # the predictor ranks the slots right
    assert r <= 0.1 + 1e-12 and p99 <= 0.5 + 1e-12
