"""What the tests share: tiny models built from configs, random batches, short training loops, and the
save → load and merge checks every adapter must pass."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors; with one they compile and
# tests/test_triton.py hands them CUDA tensors. An explicit TRITON_INTERPRET is kept either way.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import Dataset
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
)

from drt_peft import DRTModel


def tiny_bert(seed: int = 0, **config: object) -> BertForSequenceClassification:
    """A two-layer BERT classifier in eval mode; ``config`` overrides ``BertConfig`` fields (sizes, ``num_labels``)."""
    torch.manual_seed(seed)
    settings = {
        "vocab_size": 64,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 32,
        "num_labels": 2,
        "attn_implementation": "eager",
    }
    return BertForSequenceClassification(BertConfig(**{**settings, **config})).eval()


def saved_tiny_bert(folder: str | os.PathLike) -> BertForSequenceClassification:
    """:func:`tiny_bert` saved with ``save_pretrained`` into ``folder`` and loaded back with the Auto class, so
    that a DRT model built on it records ``folder`` as ``base_model_name_or_path``."""
    tiny_bert().save_pretrained(folder)
    return AutoModelForSequenceClassification.from_pretrained(folder)


def as_saved_before_layer_names(folder: str | os.PathLike) -> None:
    """Rewrite the adapter in ``folder`` as drt_peft wrote it before adapter files recorded layer names and
    shapes (``drt_layers``) and ``adapter_config.json`` its ``peft_type``."""
    file = os.path.join(folder, "adapter_model.safetensors")
    with safe_open(file, framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    del metadata["drt_layers"]
    save_file(tensors, file, metadata=metadata)
    config_file = os.path.join(folder, "adapter_config.json")
    with open(config_file) as handle:
        config = json.load(handle)
    del config["peft_type"]
    with open(config_file, "w") as handle:
        json.dump(config, handle)


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2, attn_implementation="eager")
    return GPT2LMHeadModel(config).eval()


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """A two-layer Llama whose output head is tied to its token embeddings (as in SmolLM2)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        tie_word_embeddings=True,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(config).eval()


def tiny_vit(seed: int = 0) -> ViTForImageClassification:
    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=1,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=3,
    )
    return ViTForImageClassification(config).eval()


class TinyConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.depthwise = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2)
        self.fc = nn.Linear(6 * 3 * 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.depthwise(x))
        x = torch.relu(self.conv2(x))
        return self.fc(x.flatten(1))


def tiny_mlp(sizes: tuple[int, int, int] = (6, 8, 3), seed: int = 0) -> nn.Sequential:
    """Linear → ReLU → Linear, initialised from ``seed``."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(sizes[0], sizes[1]), nn.ReLU(), nn.Linear(sizes[1], sizes[2]))


def tiny_convnet(seed: int = 0) -> TinyConvNet:
    torch.manual_seed(seed)
    return TinyConvNet().eval()


def random_bert_batch(
    generator: torch.Generator, size: int = 4, length: int = 8, vocab_size: int = 64, num_labels: int = 2
) -> dict[str, torch.Tensor]:
    """Random token ids and class labels for :func:`tiny_bert` (the ids drawn first, then the labels)."""
    return {
        "input_ids": torch.randint(0, vocab_size, (size, length), generator=generator),
        "labels": torch.randint(0, num_labels, (size,), generator=generator),
    }


def random_lm_batch(generator: torch.Generator, size: int = 4, length: int = 8) -> dict[str, torch.Tensor]:
    """Random token ids for a causal LM (:func:`tiny_gpt2`, :func:`tiny_llama`), which are also its labels."""
    ids = torch.randint(0, 64, (size, length), generator=generator)
    return {"input_ids": ids, "labels": ids}


def random_vit_batch(generator: torch.Generator, size: int = 6) -> dict[str, torch.Tensor]:
    """Random one-channel 16×16 images and class labels for :func:`tiny_vit` (the pixels drawn first)."""
    return {
        "pixel_values": torch.randn(size, 1, 16, 16, generator=generator),
        "labels": torch.randint(0, 3, (size,), generator=generator),
    }


@pytest.fixture
def bert_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(0, 64, (4, 12), generator=g), "labels": torch.tensor([0, 1, 1, 0])}


def adamw(model: nn.Module, **kwargs: object) -> torch.optim.AdamW:
    """AdamW over the model's trainable tensors (the d values, trained biases, modules_to_save)."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], **kwargs)


Batch = dict[str, torch.Tensor]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]


def _run_steps(
    model: nn.Module,
    batches: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    loss_fn: LossFn | None,
    update_masks: bool,
) -> tuple[list[float], list[dict[str, float]]]:
    """One optimizer step per batch in train mode (then eval mode); the losses and what each update_masks logged."""
    model.train()
    losses, logs = [], []
    for step, batch in enumerate(batches, start=1):
        loss = loss_fn(model, batch) if loss_fn else model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if update_masks:
            logs.append(model.update_masks(step, optimizer))
    model.eval()
    return losses, logs


def train_steps(
    model: nn.Module, batches: Iterable[Batch], lr: float = 1e-2, *, optimizer: torch.optim.Optimizer | None = None
) -> list[float]:
    """One step per batch in train mode, back in eval mode after; returns the losses.

    The optimizer is AdamW over the trainable parameters with learning rate ``lr`` unless one is given.
    """
    return _run_steps(model, batches, optimizer or adamw(model, lr=lr), None, update_masks=False)[0]


def train_updating_masks(
    model: DRTModel, batches: Iterable[Batch], lr: float = 1e-2, *, loss_fn: LossFn | None = None
) -> tuple[list[float], list[dict[str, float]]]:
    """:func:`train_steps` with ``model.update_masks(step, optimizer)`` after each step (from step 1): the losses
    and what each ``update_masks`` call returned. The loss is the model's own ``.loss`` unless
    ``loss_fn(model, batch)`` computes it; batches may be drawn lazily (a generator)."""
    return _run_steps(model, batches, adamw(model, lr=lr), loss_fn, update_masks=True)


class Parity(Dataset):
    """Label = whether token 7 occurs; learnable by a tiny BERT in a few steps."""

    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(8, 64, (n, 12), generator=g)
        self.labels = torch.randint(0, 2, (n,), generator=g)
        self.ids[self.labels == 1, 3] = 7

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def cpu_training_args(output_dir: object, **overrides: object) -> TrainingArguments:
    """Arguments for a short Trainer run in a test: CPU, seed 0, no reports, no progress bar, no checkpoints.

    ``overrides`` are any other ``TrainingArguments`` fields (``save_strategy="steps"`` to checkpoint).
    """
    defaults = {"use_cpu": True, "report_to": [], "disable_tqdm": True, "seed": 0, "save_strategy": "no"}
    return TrainingArguments(output_dir=str(output_dir), **{**defaults, **overrides})


# -- checks shared by the tests ---------------------------------------------------------------

#: What a model is called on: keyword inputs (a Hugging Face batch), positional inputs (a tuple) or one tensor.
Inputs = Mapping[str, torch.Tensor] | tuple[torch.Tensor, ...] | torch.Tensor


def outputs(model: nn.Module, inputs: Inputs) -> torch.Tensor:
    """What ``model`` computes on ``inputs``, without gradients: the logits of a Hugging Face output, the
    first element of a returned tuple (``(logits, loss)``), or the returned tensor itself."""
    with torch.no_grad():
        if isinstance(inputs, Mapping):
            result = model(**inputs)
        elif isinstance(inputs, tuple):
            result = model(*inputs)
        else:
            result = model(inputs)
    if isinstance(result, tuple):
        result = result[0]
    return result if isinstance(result, torch.Tensor) else result.logits


def assert_same_adapter(got: DRTModel, expected: DRTModel) -> None:
    """The same DRT layers, by name and type, with identical ψ (indices and masks) and trained values ϑ."""
    names = [name for name, _ in expected.drt_layers()]
    assert [name for name, _ in got.drt_layers()] == names, "the models embed different layers"
    for (name, a), (_, b) in zip(got.drt_layers(), expected.drt_layers(), strict=True):
        assert type(a) is type(b), f"{name}: {type(a).__name__} instead of {type(b).__name__}"
        for what, x, y in [
            ("indices", a.drt_indices, b.drt_indices),
            ("mask", a.get_mask(), b.get_mask()),
            ("values", a.drt_values.detach(), b.drt_values.detach()),
        ]:
            torch.testing.assert_close(x, y, rtol=0, atol=0, msg=lambda m, n=name, w=what: f"{n}: the {w} differ\n{m}")


def assert_same_outputs(got: nn.Module, expected: nn.Module, inputs: Inputs, what: str) -> None:
    """``got`` and ``expected`` compute identical outputs (same dtype and shape) on ``inputs``."""
    torch.testing.assert_close(
        outputs(got, inputs), outputs(expected, inputs), rtol=0, atol=0, msg=lambda m: f"{what}\n{m}"
    )


def assert_loads_identically(model: DRTModel, base: nn.Module, folder: str | os.PathLike, inputs: Inputs) -> DRTModel:
    """Load the adapter in ``folder`` onto ``base``: it must be ``model`` again, the same layers with identical
    ψ and ϑ, computing identical outputs on ``inputs``. Returns the loaded model."""
    loaded = DRTModel.from_pretrained(base, folder)
    assert_same_adapter(loaded, model)
    assert_same_outputs(loaded, model, inputs, f"the adapter loaded from {folder} computes other outputs")
    return loaded


def assert_save_load_roundtrip(model: DRTModel, base: nn.Module, inputs: Inputs, folder: str | os.PathLike) -> DRTModel:
    """``save_pretrained`` to ``folder``, then :func:`assert_loads_identically` onto ``base`` (a fresh copy of the
    model's base). Returns the loaded model."""
    model.save_pretrained(folder)
    return assert_loads_identically(model, base, folder, inputs)


def assert_merge_matches(model: DRTModel, inputs: Inputs, *, rtol: float = 0.0, atol: float = 0.0) -> nn.Module:
    """``merge_and_unload`` leaves no drt_peft module and computes what ``model`` computed on ``inputs``, within
    ``rtol``/``atol`` (exactly by default). Returns the merged model; ``model`` is merged in place."""
    expected = outputs(model, inputs)
    merged = model.merge_and_unload()
    left = [name for name, module in merged.named_modules() if type(module).__module__.startswith("drt_peft")]
    assert not left, f"merge_and_unload left drt_peft modules: {left[:3]}"
    torch.testing.assert_close(
        outputs(merged, inputs), expected, rtol=rtol, atol=atol, msg=lambda m: f"the merged model differs\n{m}"
    )
    return merged
