"""scripts/model_bwd_tile_orders.py, the load-balance model that backward_plan.md quotes: its tile
costs, its list scheduling with and without reserve tiles, and its output for the workloads."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "model_bwd_tile_orders.py"


@pytest.fixture(scope="module")
def model():
    spec = importlib.util.spec_from_file_location("model_bwd_tile_orders", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "length, key_block, group, causal, steps",
    [
        (256, 0, 1, False, 4),  # 256 query rows: four 64-row steps
        (256, 1, 1, False, 4),  # every key block sees every row without a mask
        (256, 1, 1, True, 2),  # causal: key block 1 (keys 128..255) from row block 2 on
        (256, 1, 4, True, 8),  # GQA: the group's four query heads
        (65, 0, 1, False, 2),  # a tail row block counts whole
        (300, 2, 1, True, 1),  # keys 256..299: row block 4 only
    ],
)
def test_tile_steps(model, length, key_block, group, causal, steps):
    assert model.tile_steps(length, key_block, group, causal) == steps


def test_greedy_list_scheduling(model):
    # Two SMs: the long tile on one, the three short ones one after another on the other.
    assert model.makespan([10, 1, 1, 1], sms=2, claim_ahead=0) == 10
    # Perfect split of equal tiles.
    assert model.makespan([3] * 4, sms=2, claim_ahead=0) == 6


def test_a_reserve_tile_waits_behind_a_long_one(model):
    # With one tile in reserve per SM, the SM busy with the long tile has already claimed a
    # short one, which then runs after it while the other SM idles.
    assert model.makespan([10, 1, 1, 1], sms=2, claim_ahead=1) == 11
    # Fewer tiles than reserves: nothing is lost.
    assert model.makespan([2, 2], sms=4, claim_ahead=2) == 2


def test_orders_hold_the_same_tiles(model):
    lengths = (300, 17, 1000)
    orders = model.orders(lengths, heads_k=2, group=4, causal=True, overhead=1.0)
    real = {name: sorted(c for c in costs if c != model.EMPTY_TILE_COST)
            for name, costs in orders.items()}
    assert len({tuple(costs) for costs in real.values()}) == 1, "every order, the same tiles"
    assert len(real["main"]) == 2 * sum(-(-length // model.KEYS_PER_TILE) for length in lengths)


def test_the_script_rates_every_workload_row():
    result = subprocess.run([sys.executable, str(SCRIPT), "--claim-ahead", "1"],
                            capture_output=True, text=True, timeout=120, check=True)
    rows = result.stdout.strip().splitlines()
    assert len(rows) == 8, rows  # docs and short x MHA and GQA x full and causal
    for row in rows:
        efficiencies = [float(cell.split()[-1]) for cell in row.split("; ")[1].split(", ")]
        assert len(efficiencies) == 4 and all(0.5 < e <= 1.0 for e in efficiencies), row
