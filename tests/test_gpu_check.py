"""benchmarks/gpu_check.py's whole logic on a CPU with tiny shapes (the GPU run itself is by
hand: bash benchmarks/gpu_check.sh), and gpu_check.sh's syntax."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from rsa_pl.config import QuantizationParams
from rsa_pl.models import QuantizationUnavailableError, check_quantization_backend

ROOT = Path(__file__).resolve().parents[1]
# What every measured step reports (part 2's steps have no MFU: they compare loss paths)
STEP = ("tokens_per_step", "median_step_s", "tokens_per_s", "peak_mib")
THROUGHPUT = (*STEP, "parameters", "mfu", "model_tflops_per_s")


def _positive(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _check_step(m: dict[str, Any], fields: tuple[str, ...], where: str) -> None:
    bad = {k: m.get(k) for k in fields if not _positive(m.get(k))}
    assert not bad, f"{where}: not finite and positive: {bad}"
    assert m["losses"], where
    assert all(math.isfinite(x) for x in m["losses"]), f"{where}: losses {m['losses']}"
    assert m["finite"] is True


def _four_bit_here() -> bool:
    try:
        check_quantization_backend(QuantizationParams(bits=4, quant_type="nf4", double_quant=True,
                                                      compute_dtype="bfloat16"), "cpu")  # fmt: skip
    except QuantizationUnavailableError:
        return False
    return True


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    out = tmp_path_factory.mktemp("gpu_check") / "gpu_check.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    command = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--size", "tiny",
               "--peak-tflops", "1", "--out", str(out)]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return json.loads(out.read_text()), done.stdout


@pytest.mark.slow
def test_gpu_check_runs_every_part_on_a_cpu_with_tiny_shapes(cpu_run: tuple[dict[str, Any], str]) -> None:
    report, stdout = cpu_run
    assert "error" not in json.dumps(report), report
    for part in ("1. ", "2. ", "3. ", "4. "):
        assert f"\n{part}" in stdout, f"part {part} printed nothing:\n{stdout}"

    # 1. throughput and MFU at both lengths
    bf16 = report["bf16"]
    assert sorted(bf16["by_seq"], key=int) == ["32", "128"]
    for seq, m in bf16["by_seq"].items():
        _check_step(m, THROUGHPUT, f"bf16 T {seq}")
        assert m["seq"] == int(seq)
        assert m["tokens_per_step"] == 2 * m["pairs"] * m["seq"]

    # 2. each loss path and method, ratios to dpo; the plain path gives the module's own losses and metrics
    paths = report["loss_paths"]
    assert paths["paths"] == ["fused", "plain"]
    assert paths["methods"] == ["dpo", "rsa-cvar"]
    for seq, by_path in paths["by_seq"].items():
        assert set(by_path["agreement"]) == {"dpo", "rsa-cvar"}
        assert all(0 <= v < 1e-5 for v in by_path["agreement"].values()), by_path["agreement"]
        for path in ("fused", "plain"):
            for method in ("dpo", "rsa-cvar"):
                m = by_path[path][method]
                _check_step(m, (*STEP, "time_x_dpo", "peak_x_dpo"), f"{path} {method} T {seq}")
            assert by_path[path]["dpo"]["time_x_dpo"] == 1.0

    # 3. and 4. need bitsandbytes' 4-bit on this CPU; without it each says so and the run goes on
    if not _four_bit_here():
        assert "unavailable" in report["nf4"]
        assert "unavailable" in report["paper"]
        return
    nf4 = report["nf4"]
    assert _positive(nf4["load_s"])
    assert nf4["quantization"]["quant_type"] == "nf4"
    for seq, m in nf4["by_seq"].items():
        _check_step(m, THROUGHPUT, f"nf4 T {seq}")

    paper = report["paper"]
    assert paper["construction_check"]["matches_load_quantized"] is True, paper["construction_check"]
    assert paper["pairs"] == 16
    assert paper["gradient_checkpointing"] is True
    assert paper["quantization"] == {"bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": "bfloat16"}
    assert paper["objective"]["measure"] == "cvar"
    assert sorted(paper["by_layers"], key=int) == ["1", "2", "3"]
    for layers, m in paper["by_layers"].items():
        _check_step(m, (*THROUGHPUT, "build_s"), f"paper {layers} layers")
    assert _positive(paper["extrapolated"]["peak_mib"])
    assert math.isfinite(paper["extrapolated"]["median_step_s"])
    assert paper["full"]["layers"] == 3
    assert "vs_extrapolated" in paper["full"]
    assert "EXTRAPOLATED" in stdout


def test_gpu_check_sh_parses() -> None:
    done = subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
