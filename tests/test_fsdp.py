"""FSDP (fully_shard) over two gloo CPU processes trains the d values exactly like one process."""

from __future__ import annotations

import torch
from conftest import adamw, random_bert_batch, tiny_bert
from ranks import run_ranks

from drt_peft import RandomConfig, get_drt_model

STEPS = 3


def _batches(rank: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(10 + rank)
    return [random_bert_batch(g) for _ in range(STEPS)]


def _train(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> None:
    optimizer = adamw(model, lr=1e-2)
    for batch in batches:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def _worker(rank: int, out: str) -> None:
    from torch.distributed.fsdp import fully_shard

    model = get_drt_model(tiny_bert(), RandomConfig(density=0.2, modules_to_save=["classifier"]))
    for block in model.get_base_model().bert.encoder.layer:
        fully_shard(block)
    fully_shard(model)
    _train(model, _batches(rank))
    values = {n: p.full_tensor().detach() for n, p in model.named_parameters() if p.requires_grad}
    if rank == 0:
        torch.save(values, f"{out}/fsdp.pt")


def test_fsdp_sharded_training_matches_one_process(tmp_path) -> None:
    run_ranks(_worker, str(tmp_path))
    sharded = torch.load(tmp_path / "fsdp.pt")
    reference = get_drt_model(tiny_bert(), RandomConfig(density=0.2, modules_to_save=["classifier"]))
    both = [{k: torch.cat([a[k], b[k]]) for k in a} for a, b in zip(_batches(0), _batches(1), strict=True)]
    _train(reference, both)
    expected = {n: p.detach() for n, p in reference.named_parameters() if p.requires_grad}
    assert sharded.keys() == expected.keys() and any(n.endswith("drt_values") for n in expected)
    for name, value in expected.items():
        assert torch.allclose(sharded[name], value, atol=1e-5), name
