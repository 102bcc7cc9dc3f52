"""analysis.cost: DiT-S/2's published size and FLOPs, and the Table 7 markdown from a real (tiny) measurement."""
import pytest

from analysis import cost


def test_dit_s2_cost_matches_the_dit_paper():
    params, gflops = cost.model_cost("DiT-S/2", input_size=32, in_channels=4, num_classes=1000)
    # DiT paper Table 4: DiT-S/2 has 33M parameters and 6.06 GFLOPs of multiply-adds (12.1 GFLOPs here)
    assert params == pytest.approx(33.0e6, rel=0.01)
    assert gflops == pytest.approx(2 * 6.06, rel=0.01)


def test_cost_table_measures_both_routings(tmp_path, capsys):
    out = tmp_path / "cost.md"
    rows = cost.main(cost.build_parser().parse_args([
        "--models", "DiT-S/8", "--input-size", "8", "--in-channels", "1", "--num-classes", "10", "--batch-size", "2",
        "--rounds", "1", "--warmup", "0", "--out", str(out)]))
    [row] = rows
    assert row["none"] > 0 and row["dtr"] > 0 and row["gflops"] > 0
    assert f"| DiT-S/8 | {row['params'] / 1e6:.1f} | {row['gflops']:.2f} | {row['none']:.2f} | {row['dtr']:.2f} |" \
        in out.read_text()
    with pytest.raises(ValueError, match="unknown model"):
        cost.main(cost.build_parser().parse_args(["--models", "DiT-Q/3"]))
