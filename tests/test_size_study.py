"""analysis.size_study: per-size gaps, crossings, flatness and costs from analysis.study results; bad folders."""
import json

import pytest

from analysis import size_study, study
from dit_closed_forms import official_forward_flops, official_parameter_count


def write_study(folder, size, fids, steps=300, **settings):
    """An analysis.study folder holding results.json made of {(routing, seed): {step: FID}}."""
    runs = {study.run_key(r, s): {"evals": {str(k): {"FID": v} for k, v in curve.items()}}
            for (r, s), curve in fids.items()}
    base = {"size": size, "model": study.STUDY_SIZES[size], "routings": ["none", "dtr"], "seeds": [0, 1],
            "steps": steps, "eval_every": 100, "batch_size": 8, "lr": 1e-3, "num_fid_samples": 250}
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({"settings": {**base, **settings}, "runs": runs, "seconds": {}}))
    return str(folder)


def test_gap_crossing_and_flatness_per_size(tmp_path):
    # toy: DTR ahead early, behind at the end on both seeds, vanilla flat (-2% over the last interval)
    toy = write_study(tmp_path / "toy", "toy", {
        ("none", 0): {100: 300.0, 200: 200.0, 300: 196.0}, ("none", 1): {100: 310.0, 200: 210.0, 300: 205.8},
        ("dtr", 0): {100: 290.0, 200: 205.0, 300: 200.0}, ("dtr", 1): {100: 300.0, 200: 214.0, 300: 209.8}})
    summary = size_study.summarise(size_study.read_study(toy))
    assert summary["final_gap"] == pytest.approx([4.0, 4.0])
    assert summary["gaps"][100] == pytest.approx([-10.0, -10.0])
    assert summary["crossing"] == "between 100 and 200"
    assert summary["flat"] is True
    assert summary["final"]["none"] == [196.0, 205.8]
    # still falling by 10% at the end: not flat; DTR better throughout: no crossing
    falling = write_study(tmp_path / "falling", "toy", {
        ("none", 0): {100: 300.0, 200: 200.0, 300: 180.0}, ("dtr", 0): {100: 290.0, 200: 190.0, 300: 170.0}})
    summary = size_study.summarise(size_study.read_study(falling))
    assert summary["flat"] is False and summary["crossing"] == "none" and summary["final_gap"] == [-10.0]


def test_costs_are_official_dits_closed_forms_forward_and_backward():
    # a study size is DiT-S/2 with its shape on 1-channel images of 10 classes; training = 3 forwards x batch
    for size in ("toy", "small"):
        shape = study.STUDY_SIZES[size]
        dims = (shape["depth"], shape["hidden_size"], shape["patch_size"])
        params, flops = size_study.model_cost(size, batch_size=8)
        assert params == official_parameter_count(*dims, in_ch=1, size=shape["image_size"], classes=10)
        assert flops == 3 * 8 * official_forward_flops(*dims, in_ch=1, size=shape["image_size"])
    for size, millions in (("base", 2.4), ("large", 5.5)):  # the sizes analysis.study's comments state
        shape = study.STUDY_SIZES[size]
        count = official_parameter_count(shape["depth"], shape["hidden_size"], shape["patch_size"], in_ch=1,
                                         size=shape["image_size"], classes=10)
        assert round(count / 1e6, 1) == millions, size


def test_main_writes_table_and_figures_and_refuses_mismatched_settings(tmp_path):
    pytest.importorskip("matplotlib")
    curves = {("none", 0): {100: 300.0, 200: 200.0}, ("dtr", 0): {100: 290.0, 200: 205.0}}
    a = write_study(tmp_path / "a", "toy", curves, steps=200)
    b = write_study(tmp_path / "b", "small", curves, steps=200)
    out = tmp_path / "out"
    size_study.main(size_study.build_parser().parse_args(["--studies", a, b, "--out", str(out)]))
    table = (out / "size_study.md").read_text()
    assert "| toy |" in table and "| small |" in table and "| 5.00 (n=1) | +5.0 |" in table
    for name in ("size_study_curves.png", "size_study_gap.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    c = write_study(tmp_path / "c", "small", curves, steps=200, lr=1e-4)
    with pytest.raises(ValueError, match="lr"):
        size_study.main(size_study.build_parser().parse_args(["--studies", a, c, "--out", str(out)]))
    with pytest.raises(ValueError, match="no results.json"):
        size_study.main(size_study.build_parser().parse_args(["--studies", str(tmp_path / "missing")]))
