"""Tiny models built from configs, shared by the tests."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset
from transformers import (
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


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=2,
        attn_implementation="eager",
    )
    return BertForSequenceClassification(config).eval()


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


def random_bert_batch(generator: torch.Generator, size: int = 4, length: int = 8) -> dict[str, torch.Tensor]:
    """Random token ids and labels for :func:`tiny_bert`."""
    return {
        "input_ids": torch.randint(0, 64, (size, length), generator=generator),
        "labels": torch.randint(0, 2, (size,), generator=generator),
    }


@pytest.fixture
def bert_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(0, 64, (4, 12), generator=g), "labels": torch.tensor([0, 1, 1, 0])}


def adamw(model: nn.Module, **kwargs: object) -> torch.optim.AdamW:
    """AdamW over the model's trainable tensors (the d values, trained biases, modules_to_save)."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], **kwargs)


def train_steps(model: nn.Module, batches: list[dict[str, torch.Tensor]], lr: float = 1e-2) -> list[float]:
    """AdamW over the trainable parameters, one step per batch, in train mode; returns the losses."""
    optimizer = adamw(model, lr=lr)
    model.train()
    losses = []
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


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
