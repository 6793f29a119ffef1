"""Two CPU processes on gloo under accelerate, different data per rank: masks stay identical on every
rank after every update, and only the d values are all-reduced."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from accelerate import Accelerator, DistributedDataParallelKwargs
from conftest import random_bert_batch, tiny_bert
from torch.nn.parallel import DistributedDataParallel

from drt_peft import RigLConfig, SETConfig, get_drt_model
from drt_peft.trainer import unwrap_drt_model

UPDATES = 20


def _worker(rank: int, port: int, method: str, out: str) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    # buffers (ψ) are not broadcast, so equal masks come from the methods' own determinism
    accelerator = Accelerator(cpu=True, kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
    config = (RigLConfig if method == "rigl" else SETConfig)(
        density=0.2, update_frequency=1, drop_fraction=0.3, t_end=10 * UPDATES
    )
    model = get_drt_model(tiny_bert(), config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
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
    accelerator.end_training()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("method", ["set", "rigl"])
def test_masks_identical_across_two_ranks(method: str, tmp_path) -> None:
    mp.spawn(_worker, args=(_free_port(), method, str(tmp_path)), nprocs=2, join=True)
    a, b = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert len(a["history"]) == UPDATES
    for step, (masks_a, masks_b) in enumerate(zip(a["history"], b["history"], strict=True), start=1):
        for name in masks_a:
            assert torch.equal(masks_a[name], masks_b[name]), f"{method}: {name} differs at step {step}"
    assert any(not torch.equal(a["history"][0][n], a["history"][-1][n]) for n in a["history"][0])
    for name in a["values"]:
        assert torch.allclose(a["values"][name], b["values"][name], atol=1e-6), name


def _redistributing_worker(rank: int, folder: str) -> None:
    from drt_peft import DSRConfig

    torch.distributed.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2)
    model = get_drt_model(tiny_bert(), DSRConfig(density=0.2, update_frequency=1))
    try:
        model.update_masks(1, None)
    finally:
        torch.distributed.destroy_process_group()


def test_redistributing_methods_refuse_several_processes(tmp_path) -> None:
    with pytest.raises(mp.ProcessRaisedException, match="DSRConfig moves trained entries between layers"):
        mp.spawn(_redistributing_worker, args=(str(tmp_path),), nprocs=2, join=True)
