"""analysis.cost: DiT-S/2's published size and FLOPs, and the Table 7 markdown from a real (tiny) measurement."""
import os

import pytest

from analysis import cost
from command_line import run_cli


def test_dit_s2_cost_matches_the_dit_paper():
    params, gflops = cost.model_cost("DiT-S/2", input_size=32, in_channels=4, num_classes=1000)
    # DiT paper Table 4: DiT-S/2 has 33M parameters and 6.06 GFLOPs of multiply-adds (12.1 GFLOPs here)
    assert params == pytest.approx(33.0e6, rel=0.01)
    assert gflops == pytest.approx(2 * 6.06, rel=0.01)


def test_cost_table_measures_both_routings(tmp_path, capsys, monkeypatch):
    # the table's contents, not a timing: one round (the refusal of such a budget has its own test)
    monkeypatch.setattr(cost, "MIN_WARMUP", 0)
    monkeypatch.setattr(cost, "MIN_ROUNDS", 1)
    out = tmp_path / "cost.md"
    rows = cost.main(cost.build_parser().parse_args([
        "--models", "DiT-S/8", "--input-size", "8", "--in-channels", "1", "--num-classes", "10", "--batch-size", "2",
        "--rounds", "1", "--warmup", "0", "--out", str(out)]))
    [row] = rows
    assert row["none"] > 0 and row["dtr"] > 0 and row["gflops"] > 0
    low, high = row["ratio_range"]
    assert low == high == pytest.approx(row["dtr"] / row["none"], rel=1e-12)  # one round: the range is its ratio
    assert (f"| DiT-S/8 | {row['params'] / 1e6:.1f} | {row['gflops']:.2f} | {row['none']:.2f} | {row['dtr']:.2f} | "
            f"{row['dtr'] / row['none']:.3f} ({low:.3f}-{high:.3f}) |") in out.read_text()
    with pytest.raises(ValueError, match="unknown model"):
        cost.main(cost.build_parser().parse_args(["--models", "DiT-Q/3"]))


def test_a_budget_too_small_to_time_anything_is_one_line(tmp_path):
    code, stderr = run_cli(cost.main, cost.build_parser(), ["--models", "DiT-S/8", "--warmup", "0", "--rounds", "1",
                                                            "--out", tmp_path / "cost.md"], "cost.py")
    assert code == 2 and stderr == (
        "cost.py: error: --warmup 0 --rounds 1 is too small to time anything: the first step of a model pays one-time "
        "setup, and the fastest of fewer than 3 rounds is noise; give --warmup >= 1 --rounds >= 3\n")
    assert not os.path.exists(tmp_path / "cost.md")
