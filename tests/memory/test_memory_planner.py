"""The memory planner (issue 6, SPEC 4): the settings and longest sequence (largest batch) it
returns fit the budget and one step more does not, judged by compiling; bad budgets say why with
the numbers; compiles are few and cached.
"""

import sys

import pytest

import ttt_jax.memory.workload as workload_module
from tests.memory_helpers import small_model
from ttt_jax.layers import BF16, LaCTConfig, NPTMLPConfig, TTTConfig
from ttt_jax.memory import LayerWorkload, ModelWorkload, Plan, PlanError, Remat, parse_bytes, plan
from ttt_jax.memory.__main__ import main
from ttt_jax.memory.planner import compiled_peak

MiB = 2**20
TTT = TTTConfig(d_model=64, num_heads=4, mini_batch_size=16, unroll=1)
NPT = NPTMLPConfig(d_model=64, d_ff=128)


@pytest.fixture
def compiles(monkeypatch):
    """Counts the compiles made (cache hits are not compiles)."""
    count = [0]
    real = workload_module.compiled_memory

    def counting(*args, **kw):
        count[0] += 1
        return real(*args, **kw)

    monkeypatch.setattr(workload_module, "compiled_memory", counting)
    return count


def assert_longest(p: Plan, step: int):
    """The plan fits, and one step more of what was searched does not (same settings)."""
    assert p.peak == compiled_peak(p.workload, p.batch, p.seq).peak <= p.budget
    bigger = (p.batch, p.seq + step) if p.searched == "seq" else (p.batch + 1, p.seq)
    assert compiled_peak(p.workload, *bigger).peak > p.budget


def test_parse_bytes():
    assert parse_bytes("24GiB") == 24 * 2**30
    assert parse_bytes("512 MiB") == 512 * MiB
    assert parse_bytes("80GB") == 80 * 10**9
    assert parse_bytes("1.5e9") == 1_500_000_000
    assert parse_bytes(1234) == 1234
    with pytest.raises(ValueError, match="not a size like 24GiB"):
        parse_bytes("lots")


def test_plan_layer_sequence(compiles):
    budget = 64 * MiB
    p = plan(TTT, budget, batch=2)
    assert p.searched == "seq" and p.batch == 2 and p.seq % 256 == 0
    assert (
        p.remat in (Remat(4), Remat(16)) and p.config.checkpoint_group == p.remat.checkpoint_group
    )
    assert compiles[0] == len(p.trials) <= 8
    print(f"TTT-Linear d=64 B=2 in 64 MiB: seq {p.seq}, {p.remat.label()}, {compiles[0]} compiles")
    # A second plan is answered from the cache.
    again = plan(TTT, budget, batch=2)
    assert again.seq == p.seq and compiles[0] == len(p.trials)
    assert_longest(p, 256)
    # The preferred (faster) group is chosen unless the other fits a >5% longer sequence.
    lean = [t.seq for t in p.trials if t.remat == Remat(16) and t.fits]
    assert p.seq >= 0.95 * max(lean)


def test_plan_lact_layer_sequence():
    config = LaCTConfig(
        d_model=64, num_heads=4, num_fw_heads=2, window=128, chunk_size=128, rank=8, precision=BF16
    )
    p = plan(config, 96 * MiB, batch=1)
    assert p.seq % 256 == 0 and p.remat in (Remat(4), Remat(16))
    assert p.config.checkpoint_group == p.remat.checkpoint_group
    assert_longest(p, 256)
    print(f"LaCT d=64 in 96 MiB: seq {p.seq}, {p.remat.label()}, {len(p.trials)} compiles")


def test_plan_batch_at_fixed_sequence():
    p = plan(NPT, 48 * MiB, seq=1024)
    assert p.searched == "batch" and p.seq == 1024 and p.batch >= 2
    assert_longest(p, 1)


def test_budget_below_parameters_says_both_numbers():
    params = LayerWorkload(TTT).state_bytes()
    with pytest.raises(ValueError, match="below the params alone") as err:
        plan(TTT, params - 1)
    assert f"({params - 1} bytes)" in str(err.value) and f"({params} bytes)" in str(err.value)
    model = small_model()
    with pytest.raises(ValueError, match="parameters \\+ optimizer state"):
        plan(model, 1000)


def test_nothing_fits_names_the_closest_setting():
    budget = LayerWorkload(TTT).state_bytes() + 1024
    with pytest.raises(PlanError, match="nothing fits") as err:
        plan(TTT, budget, seq_multiple=16)
    closest = err.value.closest
    assert closest is not None and closest.peak > budget and closest.seq == 16
    assert closest.remat.label() in str(err.value)
    for remat in (Remat(4), Remat(16)):  # every candidate was tried at the smallest shape
        assert compiled_peak(LayerWorkload(TTT).with_remat(remat), 1, 16).peak >= closest.peak


def test_plan_model_sequence():
    config = small_model()
    p = plan(config, 96 * MiB, batch=1, seq_multiple=128, max_seq=2**15)
    assert p.searched == "seq" and p.seq % 128 == 0
    assert p.state_bytes == ModelWorkload(config).state_bytes()  # parameters + AdamW moments
    assert p.config.block_remat == (p.remat.block_remat or "none")
    assert p.config.ttt.checkpoint_group == p.remat.checkpoint_group
    assert_longest(p, 128)
    print(f"small LM in 96 MiB: seq {p.seq}, {p.remat.label()}, {len(p.trials)} compiles")


def test_bad_arguments():
    with pytest.raises(ValueError, match="budget_bytes=0 must be > 0"):
        plan(TTT, 0)
    with pytest.raises(ValueError, match="cannot plan for a dict"):
        plan({}, 2**30)
    with pytest.raises(ValueError, match="tolerance=1.5"):
        plan(TTT, 2**30, tolerance=1.5)


def test_cli_plan(monkeypatch, capsys):
    argv = ["plan", "--layer", "npt", "--d-model", "64", "--d-ff", "128", "--budget", "48MiB"]
    monkeypatch.setattr(sys, "argv", ["python -m ttt_jax.memory", *argv, "--search", "batch"])
    main()
    out = capsys.readouterr().out
    assert "fits: batch=" in out and "seq=2048 (batch searched)" in out and "(params " in out
