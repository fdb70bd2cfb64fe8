"""Every Triton kernel, run by Triton's CPU interpreter on small ragged shapes, matches its torch reference
in forward and in every gradient (fp32 tolerance); NF4 dequantization equals bitsandbytes' own.

The kernels run in one child process (see ``kernels_cases.py``: Triton must see TRITON_INTERPRET=1
before it is first imported, and collection imports it in this process)."""

from __future__ import annotations

import pytest

from kernels_cases import run_cases

CASES = ["backend_is_interpreted", "rmsnorm", "rope", "gated_activations", "lora_gated", "fused_linear_cross_entropy",
         "nf4_vs_bitsandbytes", "nf4_many", "fused_lora_linear", "fused_lora_qkv", "fused_lora_mlp",
         "mlp_recompute", "mlp_chunked_backward", "offloaded_checkpoint"]


@pytest.fixture(scope="module")
def results():
    pytest.importorskip("triton")
    return run_cases(CASES)


@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_reference(results, case):
    assert results[case] == "ok", results[case]
