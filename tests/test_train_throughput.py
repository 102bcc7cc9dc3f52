"""benchmarks/train_throughput.py builds every backbone family by zoo name and reports routed vs unrouted steps."""
import pytest

from benchmarks import train_throughput
from models import create_model


@pytest.mark.parametrize("model, model_args, input_size", [
    ("ADM-ImageNet64", ["model_channels=32", "channel_mult=[1,2]", "attention_resolutions=[4]",
                        "num_head_channels=16", "num_res_blocks=1"], 8),
    ("DiT-S/2", ["hidden_size=32", "depth=2", "num_heads=2"], 8),
])
def test_benchmark_reports_dtr_over_unrouted_for_each_family(model, model_args, input_size):
    argv = ["--model", model, "--input-size", str(input_size), "--batch-size", "2", "--threads", "1", "--steps", "2",
            "--warmup", "0", "--matmul-size", "64", *[f"--model-arg={a}" for a in model_args]]
    report = train_throughput.main(train_throughput.build_parser().parse_args(argv))
    expected = create_model(model, **report["model_args"], input_size=input_size)
    assert report["parameters"] == sum(p.numel() for p in expected.parameters())  # routing adds none
    assert report["input"] == [expected.in_channels, input_size, input_size]
    dtr, none = report["results"]
    assert (dtr["routing"], none["routing"]) == ("dtr", "none")
    # the mask multiplies are elementwise: the counted matmul / conv FLOPs are the same with and without DTR
    assert dtr["train_flops_per_step"] == none["train_flops_per_step"] > 0
    assert report["step_time_ratio_routed_to_unrouted_paired"] > 0
    assert report["images_per_sec_ratio_routed_to_unrouted"] == pytest.approx(
        dtr["images_per_sec"] / none["images_per_sec"])


def test_text_benchmark_pairs_the_text_model_with_the_class_model_and_the_encoder(tiny_clip_path):
    argv = ["--model", "TextDiT-S/2", "--input-size", "8", "--batch-size", "2", "--threads", "1", "--steps", "2",
            "--warmup", "0", "--matmul-size", "64", "--text-encoder", tiny_clip_path,
            *[f"--model-arg={a}" for a in ["hidden_size=32", "depth=2", "num_heads=2"]]]
    report = train_throughput.main(train_throughput.build_parser().parse_args(argv))
    flops = report["text_train_flops_per_step"]
    # cross-attention costs FLOPs the class model does not have; DTR adds none
    assert flops["text/dtr/precomputed"] == flops["text/none/precomputed"] > flops["class/dtr"] > 0
    assert set(report["text_sec_per_step"]) == {*flops, "encoder"}
    for key in ("text_over_class_step_time_dtr", "on_the_fly_over_precomputed_step_time_dtr",
                "encoder_share_of_on_the_fly_step_dtr", "text_step_time_routed_over_unrouted"):
        assert report[key] > 0, key
    assert report["parameters"] == sum(p.numel() for p in create_model(
        "TextDiT-S/2", **report["model_args"], input_size=8, context_dim=16).parameters())
