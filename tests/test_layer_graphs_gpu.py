"""Layer graphs captured for real (``torch.cuda.graph``): four training steps of a small LoRA model under bf16
autocast, with new positions every step and AdamW in between, give the same losses and gradients with graphs as
without; every offloaded layer is captured once and replayed after. Skipped without CUDA."""

from __future__ import annotations

import copy

import pytest
import torch

from kernels_models import VOCAB, tiny_lora_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")

LAYERS = 4


def _batch(step: int, rows: int = 2, length: int = 256):
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(3, VOCAB, (rows, length), generator=g)
    cut = 16 + 8 * step
    positions = torch.cat([torch.arange(cut), torch.arange(length - cut)]).repeat(rows, 1)
    return {k: v.cuda() for k, v in dict(input_ids=ids, labels=ids.clone(), position_ids=positions).items()}


@pytest.mark.parametrize("warmup", ["full", "light"])
def test_graphed_layers_train_like_eager_ones(warmup: str, monkeypatch) -> None:
    """``light``: the capture stream warmed by two tiny matmuls instead of a run of the layer
    (``LLMFORGE_GRAPH_WARMUP=light``)."""
    from llmforge.kernels import layer_graphs
    from llmforge.kernels.patch import patch_model, unpatch_rope

    monkeypatch.setattr(layer_graphs, "LIGHT_WARMUP", warmup == "light")

    ref = tiny_lora_model("llama", num_layers=LAYERS).cuda()
    new = copy.deepcopy(ref)
    reports = []
    for model, graphs in ((ref, False), (new, True)):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        reports.append(patch_model(model, offload_checkpointing=True, cuda_graphs=graphs))
    graphs = reports[1].layer_graphs
    assert graphs is not None, reports[1].summary()
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3) for m in (ref, new)]
    try:
        for step in range(4):
            losses, grads = [], []
            for model, opt in zip((ref, new), opts):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = model(**_batch(step)).loss
                loss.backward()
                losses.append(float(loss.detach()))
                grads.append({n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad})
                opt.step()
                opt.zero_grad(set_to_none=True)
            assert abs(losses[0] - losses[1]) <= 1e-3 * abs(losses[0]), (step, losses)
            for name, g in grads[0].items():
                scale = float(g.abs().max())
                assert scale > 0, name
                assert float((grads[1][name] - g).abs().max()) <= 2e-2 * scale, (step, name)
    finally:
        unpatch_rope(ref)
    print(graphs.stats())
    assert graphs.counts["captured forward"] == graphs.counts["captured backward"] == LAYERS, graphs.stats()
    assert graphs.counts["replayed backward"] == 3 * LAYERS, graphs.stats()
    assert set(graphs.reasons) == {"warm-up"}, graphs.stats()
