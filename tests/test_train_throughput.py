"""benchmarks/train_throughput.py builds every backbone family by zoo name and reports routed vs unrouted steps."""
import pytest

from benchmarks import train_throughput
from dit_closed_forms import official_forward_flops
from models import create_model
from scripted_clock import ScriptedClock
from training.step_cost import build_training_step


def label_timed_functions(monkeypatch):
    """label_of(fn) for every function the benchmark times: '<routing>' (the main comparison's steps),
    'text/<routing>/precomputed' or '/on-the-fly', 'class/<routing>' (the paired class DiT), 'encoder', 'matmul'.

    Steps are labelled by a spy on the benchmark's build_training_step.
    """
    labels = {}

    def build(args, routing, device, model_name=None, encoder=None):
        built = build_training_step(args, routing, device, model_name, encoder)
        labels[built[0]] = (f"text/{routing}/precomputed" if encoder is not None
                            else f"class/{routing}" if model_name else routing)
        return built
    monkeypatch.setattr(train_throughput, "build_training_step", build)

    def label_of(fn):
        if fn in labels:
            return labels[fn]
        if fn.__name__ == "burst":
            return "matmul"
        if fn.__defaults__:  # lambda step=step: step(on_the_fly=True)
            return labels[fn.__defaults__[0]].replace("precomputed", "on-the-fly")
        return "encoder"
    return label_of


@pytest.mark.parametrize("model, model_args, input_size", [
    ("ADM-ImageNet64", ["model_channels=32", "channel_mult=[1,2]", "attention_resolutions=[4]",
                        "num_head_channels=16", "num_res_blocks=1"], 8),
    ("DiT-S/2", ["hidden_size=32", "depth=2", "num_heads=2"], 8),
])
def test_benchmark_reports_fastest_and_median_rounds_and_the_paired_ratio(model, model_args, input_size, monkeypatch):
    # one warm-up round (fastest of all: must not count), then 3 timed rounds of each
    clock = ScriptedClock({"dtr": [0.01, 0.4, 0.5, 0.32], "none": [0.02, 0.5, 0.25, 0.4],
                           "matmul": [0.001, 0.02, 0.01, 0.04]}, label_timed_functions(monkeypatch))
    monkeypatch.setattr(train_throughput, "timed", clock.timed)
    argv = ["--model", model, "--input-size", str(input_size), "--batch-size", "2", "--threads", "1", "--steps", "3",
            "--warmup", "1", "--matmul-size", "64", *[f"--model-arg={a}" for a in model_args]]
    report = train_throughput.main(train_throughput.build_parser().parse_args(argv))
    expected = create_model(model, **report["model_args"], input_size=input_size)
    assert report["parameters"] == sum(p.numel() for p in expected.parameters())  # routing adds none
    assert report["input"] == [expected.in_channels, input_size, input_size]
    dtr, none = report["results"]
    assert (dtr["routing"], none["routing"]) == ("dtr", "none")
    # the mask multiplies are elementwise: the counted matmul / conv FLOPs are the same with and without DTR
    flops = dtr["train_flops_per_step"]
    assert none["train_flops_per_step"] == flops > 0
    if model.startswith("DiT"):  # forward + backward = 3 forwards of the batch of 2
        assert flops == 3 * 2 * official_forward_flops(depth=2, d=32, p=2, in_ch=4, size=8)
    # fastest timed round: DTR 0.32 s, vanilla 0.25 s, matmul burst (4 x 2 * 64^3 FLOPs) 0.01 s; medians 0.4 s
    peak = 4 * 2 * 64 ** 3 / 0.01
    assert report["matmul_peak_flops_per_sec"] == pytest.approx(peak)
    assert (dtr["images_per_sec"], dtr["images_per_sec_median"], dtr["sec_per_step"]) == pytest.approx((6.25, 5, 0.32))
    assert (none["images_per_sec"], none["images_per_sec_median"]) == pytest.approx((8, 5))
    assert dtr["share_of_matmul_peak"] == pytest.approx(flops / 0.32 / peak)
    assert report["images_per_sec_ratio_routed_to_unrouted"] == pytest.approx(6.25 / 8)
    # per round DTR / vanilla: 0.4 / 0.5, 0.5 / 0.25, 0.32 / 0.4 -> median 0.8
    assert report["step_time_ratio_routed_to_unrouted_paired"] == pytest.approx(0.8)


def test_text_benchmark_pairs_the_text_model_with_the_class_model_and_the_encoder(tiny_clip_path, monkeypatch):
    seconds = {"text/dtr/precomputed": 0.3, "text/none/precomputed": 0.25, "text/dtr/on-the-fly": 0.5,
               "text/none/on-the-fly": 0.45, "class/dtr": 0.2, "class/none": 0.1, "encoder": 0.15, "matmul": 0.01}
    clock = ScriptedClock(seconds, label_timed_functions(monkeypatch))
    monkeypatch.setattr(train_throughput, "timed", clock.timed)
    argv = ["--model", "TextDiT-S/2", "--input-size", "8", "--batch-size", "2", "--threads", "1", "--steps", "2",
            "--warmup", "0", "--matmul-size", "64", "--text-encoder", tiny_clip_path,
            *[f"--model-arg={a}" for a in ["hidden_size=32", "depth=2", "num_heads=2"]]]
    report = train_throughput.main(train_throughput.build_parser().parse_args(argv))
    flops = report["text_train_flops_per_step"]
    # cross-attention costs FLOPs the class model does not have; DTR adds none
    assert flops["text/dtr/precomputed"] == flops["text/none/precomputed"] > flops["class/dtr"] > 0
    assert flops["class/dtr"] == 3 * 2 * official_forward_flops(depth=2, d=32, p=2, in_ch=4, size=8)
    assert report["text_sec_per_step"] == {k: v for k, v in seconds.items() if k != "matmul"}
    assert report["text_over_class_step_time_dtr"] == pytest.approx(0.3 / 0.2)
    assert report["text_over_class_step_time_none"] == pytest.approx(0.25 / 0.1)
    assert report["on_the_fly_over_precomputed_step_time_dtr"] == pytest.approx(0.5 / 0.3)
    assert report["encoder_share_of_on_the_fly_step_none"] == pytest.approx(0.15 / 0.45)
    assert report["text_step_time_routed_over_unrouted"] == pytest.approx(0.3 / 0.25)
    assert report["parameters"] == sum(p.numel() for p in create_model(
        "TextDiT-S/2", **report["model_args"], input_size=8, context_dim=16).parameters())
