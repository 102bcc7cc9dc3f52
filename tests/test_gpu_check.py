"""benchmarks/gpu_check.py --cpu-smoke: every check of the GPU acceptance run works, on tiny models with gloo."""
import os

import torch

from benchmarks import gpu_check


def test_cpu_smoke_runs_every_check_and_finds_no_sync(capsys):
    environ = dict(os.environ)
    rows = gpu_check.main(["--cpu-smoke", "--compile-backend", "eager"])  # dynamo only: aot_eager is in test_training_fast_path
    assert dict(os.environ) == environ  # the process-group check restores the launcher's variables
    assert not torch.distributed.is_initialized()
    table = capsys.readouterr().out
    by_check = {}
    for check, setting, result in rows:
        by_check.setdefault(check, []).append((setting, result))
        assert setting in table and result in table
    assert by_check["process group"][0][0].startswith("gloo") and "ok=True" in by_check["process group"][0][1]
    assert len(by_check["DDP step"]) == 1
    assert [r for _, r in by_check["attention backend"]] == ["flash"] * 3  # DiT, ADM, TextDiT
    assert [r for _, r in by_check["host syncs / training step"]] == ["0"] * 4  # vanilla, Min-SNR, P2, ANT-UW
    assert by_check["host syncs / sampling step"][0][1].startswith("0 ")
    for check in ("bf16 vs fp32", "compile vs eager", "matmul peak", "training throughput", "DTR / no routing",
                  "DDPM-250 CFG 1.5 sampling"):
        assert len(by_check[check]) == 1, check
