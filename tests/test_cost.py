"""analysis.cost: DiT-S/2's published size and FLOPs, and the Table 7 row from real steps timed by a scripted clock."""
import os

import pytest

from analysis import cost
from command_line import run_cli
from dit_closed_forms import official_forward_flops, official_parameter_count
from scripted_clock import ScriptedClock
from training.step_cost import build_training_step


def test_dit_s2_cost_matches_the_dit_paper():
    params, gflops = cost.model_cost("DiT-S/2", input_size=32, in_channels=4, num_classes=1000)
    # DiT paper Table 4: DiT-S/2 has 33M parameters and 6.06 GFLOPs of multiply-adds (12.1 GFLOPs here)
    assert params == pytest.approx(33.0e6, rel=0.01)
    assert gflops == pytest.approx(2 * 6.06, rel=0.01)
    # ...exactly the closed forms of its layer shapes
    assert params == official_parameter_count(12, 384, 2)
    assert gflops == official_forward_flops(12, 384, 2) / 1e9


def test_cost_table_reports_the_fastest_round_and_the_per_round_ratio_range(tmp_path, monkeypatch):
    # a warm-up round (fastest of all, and must not count), then 3 timed rounds of each routing
    routing_of = {}

    def build_step(config, routing, device):
        step, flops, info = build_training_step(config, routing, device)
        routing_of[step] = routing
        return step, flops, info

    clock = ScriptedClock({"none": [0.1, 0.5, 0.25, 0.4], "dtr": [0.05, 0.4, 0.5, 0.32]}, routing_of.get)
    monkeypatch.setattr(cost, "build_training_step", build_step)
    monkeypatch.setattr(cost, "timed", clock.timed)
    out = tmp_path / "cost.md"
    [row] = cost.main(cost.build_parser().parse_args([
        "--models", "DiT-S/8", "--input-size", "8", "--in-channels", "1", "--num-classes", "10", "--batch-size", "2",
        "--rounds", "3", "--warmup", "1", "--out", str(out)]))
    assert row["params"] == official_parameter_count(12, 384, 8, in_ch=1, size=8, classes=10)  # 32.54M
    assert row["gflops"] == official_forward_flops(12, 384, 8, in_ch=1, size=8) / 1e9  # 0.065
    # images/s: batch 2 over the fastest round (none 0.25 s, DTR 0.32 s); per-round vanilla / DTR seconds:
    # 0.5 / 0.4, 0.25 / 0.5, 0.4 / 0.32
    assert (row["none"], row["dtr"], row["ratio_range"]) == (8.0, 6.25, (0.5, 1.25))
    assert "| DiT-S/8 | 32.5 | 0.06 | 8.00 | 6.25 | 0.781 (0.500-1.250) |" in out.read_text()
    with pytest.raises(ValueError, match="unknown model"):
        cost.main(cost.build_parser().parse_args(["--models", "DiT-Q/3"]))


def test_a_budget_too_small_to_time_anything_is_one_line(tmp_path):
    code, stderr = run_cli(cost.main, cost.build_parser(), ["--models", "DiT-S/8", "--warmup", "0", "--rounds", "1",
                                                            "--out", tmp_path / "cost.md"], "cost.py")
    assert code == 2 and stderr == (
        "cost.py: error: --warmup 0 --rounds 1 is too small to time anything: the first step of a model pays one-time "
        "setup, and the fastest of fewer than 3 rounds is noise; give --warmup >= 1 --rounds >= 3\n")
    assert not os.path.exists(tmp_path / "cost.md")
