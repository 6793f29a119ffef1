"""The tiled CPU kernels (SDDMM, SpMM) and the choice between the SDDMM and a dense weight gradient."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from drt_peft.layer import DRTLayer, cpu_kernels, ops
from drt_peft.layer.cpu_kernels import TILE, tiled_sddmm, tiled_spmm
from drt_peft.layer.ops import _pattern_flat_indices, csr_pattern


def _pattern(
    indices: list[int] | torch.Tensor, shape: tuple[int, int], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    return csr_pattern(torch.as_tensor(indices).sort().values, shape, dtype)


def _random_pattern(shape: tuple[int, int], d: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return _pattern(torch.randperm(shape[0] * shape[1], generator=torch.Generator().manual_seed(1))[:d], shape, dtype)


def _dense_reference(pattern: torch.Tensor, a_tokens: torch.Tensor, b_tokens: torch.Tensor) -> torch.Tensor:
    dense = a_tokens.double().t() @ b_tokens.double()
    return dense.reshape(-1)[_pattern_flat_indices(pattern)].to(a_tokens.dtype)


def _with_threads(threads: int, fn: Callable[[], Tensor]) -> Tensor:
    """``fn()`` with torch (and so the kernels) at ``threads`` threads and no minimum work per thread, so that
    these small products do run on that many threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(cpu_kernels, "GRAIN", 1)
            return fn()
    finally:
        torch.set_num_threads(before)


_POOL_PROBE = """
import torch
torch.set_num_threads({threads})
import numba
from drt_peft.layer.cpu_kernels import tiled_sddmm
pattern = torch.eye(4).to_sparse_csr()
tiled_sddmm(pattern.crow_indices(), pattern.col_indices(), torch.ones(8, 4), torch.ones(8, 4))
print(numba.config.NUMBA_NUM_THREADS, numba.get_num_threads())
"""


@pytest.mark.parametrize(("threads", "env", "expected"), [(1, {}, "1 1"), (1, {"NUMBA_NUM_THREADS": "2"}, "2 1")])
def test_the_pool_starts_with_torchs_threads_unless_numba_num_threads_is_set(
    threads: int, env: dict[str, str], expected: str
) -> None:
    """Workers beyond torch's count would spin idle on libgomp's active wait, so the pool has none (a fresh process:
    the pool is launched once per process)."""
    clean = {k: v for k, v in os.environ.items() if k not in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS")}
    probe = subprocess.run(
        [sys.executable, "-c", _POOL_PROBE.format(threads=threads)], env={**clean, **env}, capture_output=True,
        text=True, timeout=300, check=True,
    )  # fmt: skip
    assert probe.stdout.split("\n")[-2] == expected


def test_small_products_run_on_fewer_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu_kernels._start_pool()  # launched as it would be, before the counts are faked
    chosen = []
    monkeypatch.setattr(cpu_kernels.numba, "set_num_threads", chosen.append)
    monkeypatch.setattr(cpu_kernels.numba.config, "NUMBA_NUM_THREADS", 8)
    monkeypatch.setattr(cpu_kernels.torch, "get_num_threads", lambda: 4)
    grain = cpu_kernels.GRAIN
    assert cpu_kernels._threads(tokens=8 * TILE, work_per_token=grain // TILE) == 4  # 8 grains of work, 4 threads
    assert cpu_kernels._threads(tokens=8 * TILE, work_per_token=grain // (4 * TILE)) == 2  # 2 grains
    assert cpu_kernels._threads(tokens=8 * TILE, work_per_token=grain // (16 * TILE)) == 1  # half a grain
    assert cpu_kernels._threads(tokens=TILE, work_per_token=grain) == 1  # one tile: one thread
    assert chosen == [4, 2, 1, 1]


@pytest.mark.parametrize("tokens", [1, TILE - 1, TILE, 3 * TILE + 5])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tiled_sddmm_matches_the_dense_product(tokens: int, threads: int, dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(tokens, 37, generator=generator, dtype=dtype)
    b = torch.randn(tokens, 23, generator=generator, dtype=dtype)
    pattern = _random_pattern((37, 23), 90, dtype)
    got = _with_threads(threads, lambda: tiled_sddmm(pattern.crow_indices(), pattern.col_indices(), a, b))
    assert got.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    assert torch.allclose(got, _dense_reference(pattern, a, b), atol=tolerance * tokens, rtol=tolerance)


def test_tiled_sddmm_with_empty_rows_strided_factors_and_no_tokens() -> None:
    generator = torch.Generator().manual_seed(2)
    # entries in rows 1 and 4 only, columns 0, 2 and 5; the other rows and columns are never read
    pattern = _pattern([1 * 6 + 0, 1 * 6 + 5, 4 * 6 + 2], (5, 6))
    a_t, b_t = torch.randn(5, 2 * TILE + 3, generator=generator), torch.randn(6, 2 * TILE + 3, generator=generator)
    a, b = a_t.t(), b_t.t()  # token-major views with strides, copied once by the kernel
    got = tiled_sddmm(pattern.crow_indices(), pattern.col_indices(), a, b)
    expected = torch.stack([a[:, 1] @ b[:, 0], a[:, 1] @ b[:, 5], a[:, 4] @ b[:, 2]])
    assert torch.allclose(got, expected, atol=1e-5)
    empty = tiled_sddmm(pattern.crow_indices(), pattern.col_indices(), a[:0], b[:0])
    assert torch.equal(empty, torch.zeros(3))


@pytest.mark.parametrize("tokens", [1, TILE - 1, TILE, 3 * TILE + 5])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tiled_spmm_matches_the_dense_product(tokens: int, threads: int, dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(tokens, 23, generator=generator, dtype=dtype)
    dense = torch.zeros(37, 23, dtype=dtype)
    pattern = _random_pattern((37, 23), 90, dtype)  # some rows are empty: their outputs are zero
    flat = _pattern_flat_indices(pattern)
    dense.view(-1)[flat] = torch.randn(flat.numel(), generator=generator, dtype=dtype)
    matrix = dense.to_sparse_csr()
    got = _with_threads(threads, lambda: tiled_spmm(matrix.crow_indices(), matrix.col_indices(), matrix.values(), x))
    assert got.dtype == dtype and got.shape == (tokens, 37)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    assert torch.allclose(got, x @ dense.t(), atol=tolerance * 10, rtol=tolerance)
    assert tiled_spmm(matrix.crow_indices(), matrix.col_indices(), matrix.values(), x[:0]).shape == (0, 37)


def _trained_layer(density: float) -> tuple[DRTLayer, torch.Tensor]:
    torch.manual_seed(0)
    module = nn.Linear(50, 40)
    d = int(density * module.weight.numel())
    indices = torch.randperm(module.weight.numel(), generator=torch.Generator().manual_seed(3))[:d].sort().values
    layer = DRTLayer(module, indices, "freeze")
    layer(torch.randn(4, 30, 50)).square().sum().backward()
    return layer, layer.drt_values.grad.clone()


@pytest.mark.parametrize(("density", "kernel"), [(0.05, "tiled"), (0.3, "dense")])
def test_the_kernel_follows_the_density_and_gives_the_same_gradient(
    density: float, kernel: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    assert density < ops.DENSE_GRADIENT_DENSITY if kernel == "tiled" else density > ops.DENSE_GRADIENT_DENSITY
    with caplog.at_level(logging.DEBUG, logger="drt_peft"):
        layer, grad = _trained_layer(density)
    assert layer.op.last_grad_kernel == kernel
    assert [r.getMessage() for r in caplog.records if "weight gradient" in r.getMessage()] == [
        f"Linear 40×50, {layer.num_trainable} trained: weight gradient by {kernel}"
    ]
    other = {"tiled": 0.0, "dense": 1.0}[kernel]  # force the other path
    monkeypatch.setattr(ops, "DENSE_GRADIENT_DENSITY", other)
    layer_other, grad_other = _trained_layer(density)
    assert layer_other.op.last_grad_kernel != kernel
    assert torch.allclose(grad, grad_other, atol=1e-4, rtol=1e-5)
