"""Two CPU processes on gloo under accelerate, different data per rank: masks stay identical on every
rank after every update, and only the d values are all-reduced."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
from accelerate import Accelerator, DistributedDataParallelKwargs
from conftest import adamw, random_bert_batch, tiny_bert
from ranks import run_ranks
from torch.nn.parallel import DistributedDataParallel

from drt_peft import DeepRConfig, RigLConfig, SETConfig, SpIELConfig, get_drt_model
from drt_peft.trainer import unwrap_drt_model

UPDATES = 20
RIGL = {"density": 0.2, "update_frequency": 1, "drop_fraction": 0.3, "t_end": 10 * UPDATES}
CONFIGS = {
    "set": lambda: SETConfig(density=0.2, update_frequency=1, drop_fraction=0.3, t_end=10 * UPDATES),
    "rigl": lambda: RigLConfig(**RIGL),
    "rigl-line-caps": lambda: RigLConfig(**RIGL, max_row_density=0.3, max_column_density=0.3),  # regrowth under caps
    "spiel": lambda: SpIELConfig(density=0.2, update_frequency=2, accumulation_steps=2, t_end=10 * UPDATES),
    "deep_r": lambda: DeepRConfig(density=0.2, temperature=1e-5, l1=1e-3),  # noise drawn on every rank alike
}


def _worker(rank: int, method: str, out: str) -> None:
    # run_ranks formed the gloo group; accelerate finds it
    # buffers (ψ) are not broadcast, so equal masks come from the methods' own determinism
    accelerator = Accelerator(cpu=True, kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
    model = get_drt_model(tiny_bert(), CONFIGS[method]())
    optimizer = adamw(model, lr=1e-2)
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    assert isinstance(wrapped, DistributedDataParallel)
    synced = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    assert synced == sum(layer.num_trainable for _, layer in model.drt_layers())  # communication ∝ d
    g = torch.Generator().manual_seed(100 + rank)  # different data on each rank
    history = []
    for step in range(1, UPDATES + 1):
        accelerator.backward(wrapped(**random_bert_batch(g)).loss)
        optimizer.step()
        optimizer.zero_grad()
        unwrap_drt_model(wrapped).update_masks(step, optimizer)
        history.append({name: layer.drt_indices.clone() for name, layer in model.drt_layers()})
    values = {name: layer.drt_values.detach().clone() for name, layer in model.drt_layers()}
    torch.save({"history": history, "values": values}, f"{out}/rank{rank}.pt")


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_masks_identical_across_two_ranks(method: str, tmp_path) -> None:
    run_ranks(_worker, method, str(tmp_path))
    a, b = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert len(a["history"]) == UPDATES
    for step, (masks_a, masks_b) in enumerate(zip(a["history"], b["history"], strict=True), start=1):
        for name in masks_a:
            assert torch.equal(masks_a[name], masks_b[name]), f"{method}: {name} differs at step {step}"
    assert any(not torch.equal(a["history"][0][n], a["history"][-1][n]) for n in a["history"][0])
    for name in a["values"]:
        assert torch.allclose(a["values"][name], b["values"][name], atol=1e-6), name


def _redistributing_worker(rank: int) -> None:
    from drt_peft import DSRConfig

    model = get_drt_model(tiny_bert(), DSRConfig(density=0.2, update_frequency=1))
    model.update_masks(1, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1))


def test_redistributing_methods_refuse_several_processes() -> None:
    with pytest.raises(mp.ProcessRaisedException, match="DSRConfig moves trained entries between layers") as failure:
        run_ranks(_redistributing_worker)
    assert "rank 0 raised" in str(failure.value) and "rank 1 raised" in str(failure.value)
