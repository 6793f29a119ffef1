"""calibration_data in the shapes people have: datasets, rows, generators; and the progress bars of scoring."""

from __future__ import annotations

import io
import logging
import sys

import datasets
import pytest
import torch
from conftest import tiny_bert
from transformers import BertTokenizer, DataCollatorWithPadding

import drt_peft
from drt_peft import (
    FISHConfig,
    FORCEConfig,
    GraSPAbsConfig,
    GraSPConfig,
    SNIPConfig,
    SynFlowConfig,
    get_drt_model,
)
from drt_peft.masks.calibration import to_device

NUM_ROWS, LENGTH = 16, 10


def _tensors(seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 64, (NUM_ROWS, LENGTH), generator=g), torch.randint(0, 2, (NUM_ROWS,), generator=g)


def _rows() -> list[dict[str, object]]:
    """Tokenized rows as ``datasets`` gives them: python lists and ints, a ``label`` and a text column."""
    ids, labels = _tensors()
    return [{"text": f"row {i}", "input_ids": ids[i].tolist(), "label": int(labels[i])} for i in range(NUM_ROWS)]


def _batches(size: int = 8) -> list[dict[str, torch.Tensor]]:
    """The same examples as :func:`_rows`, batched by hand."""
    ids, labels = _tensors()
    return [{"input_ids": ids[i : i + size], "labels": labels[i : i + size]} for i in range(0, NUM_ROWS, size)]


def _masks(config, data, **kwargs) -> dict[str, torch.Tensor]:
    return get_drt_model(tiny_bert(), config, calibration_data=data, **kwargs).get_masks()


def _assert_same(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in got), "the masks differ"


def _one_shot(batches: list, taken: list) -> object:
    """A generator over ``batches`` that records what was read from it."""
    for batch in batches:
        taken.append(batch)
        yield batch


@pytest.mark.parametrize(
    "config", [SNIPConfig(density=0.1), FISHConfig(density=0.1, num_samples=NUM_ROWS)], ids=["snip", "fish"]
)
def test_a_dataset_of_tokenized_rows_gives_the_mask_of_the_same_batches(config) -> None:
    expected = _masks(config, _batches(8))
    dataset = datasets.Dataset.from_list(_rows())
    _assert_same(_masks(config, dataset, calibration_batch_size=8), expected)
    _assert_same(_masks(config, dataset.with_format("torch"), calibration_batch_size=8), expected)
    _assert_same(_masks(config, _rows()), expected)  # a list of rows, the default batch size 8


def test_an_iterable_dataset_works_for_a_one_pass_criterion() -> None:
    streamed = datasets.Dataset.from_list(_rows()).to_iterable_dataset()
    _assert_same(_masks(SNIPConfig(density=0.1), streamed), _masks(SNIPConfig(density=0.1), _batches(8)))


def test_calibration_batch_size_and_num_batches_count_collated_rows() -> None:
    seen: list[int] = []

    def loss_fn(model, batch):
        seen.append(len(batch["labels"]))
        return model(**batch).loss

    dataset = datasets.Dataset.from_list(_rows()).remove_columns("text")
    get_drt_model(tiny_bert(), SNIPConfig(density=0.1), dataset, loss_fn, calibration_batch_size=5)
    assert seen == [5, 5, 5, 1]
    seen.clear()
    get_drt_model(tiny_bert(), SNIPConfig(density=0.1, num_batches=2), dataset, loss_fn, calibration_batch_size=3)
    assert seen == [3, 3]
    with pytest.raises(ValueError, match="calibration_batch_size=0 must be a positive integer"):
        get_drt_model(tiny_bert(), SNIPConfig(density=0.1), dataset, calibration_batch_size=0)


def test_unbatched_rows_of_tensors_are_collated() -> None:
    ids, labels = _tensors()
    rows = [{"input_ids": ids[i], "labels": labels[i]} for i in range(NUM_ROWS)]
    expected = _masks(SNIPConfig(density=0.1), _batches(4))
    _assert_same(_masks(SNIPConfig(density=0.1), rows, calibration_batch_size=4), expected)


def test_rows_of_different_lengths_need_a_padding_collator(tmp_path) -> None:
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(59)]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab))
    tokenizer = BertTokenizer(str(tmp_path / "vocab.txt"))
    rows = _rows()
    for i, row in enumerate(rows):
        row["input_ids"] = [max(t, 5) for t in row["input_ids"][: LENGTH - i % 3]]  # lengths 10, 9, 8; no [PAD]
    dataset = datasets.Dataset.from_list(rows)
    with pytest.raises(ValueError, match=r"calibration_data rows could not be collated.*DataCollatorWithPadding"):
        _masks(SNIPConfig(density=0.1), dataset)
    padded = []
    for start in range(0, NUM_ROWS, 8):
        chunk = rows[start : start + 8]
        width = max(len(r["input_ids"]) for r in chunk)
        ids = torch.tensor([r["input_ids"] + [0] * (width - len(r["input_ids"])) for r in chunk])
        labels = torch.tensor([r["label"] for r in chunk])
        padded.append({"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": labels})
    got = _masks(SNIPConfig(density=0.1), dataset, data_collator=DataCollatorWithPadding(tokenizer))
    _assert_same(got, _masks(SNIPConfig(density=0.1), padded))


@pytest.mark.parametrize(
    ("config", "reads"),
    [
        (FORCEConfig(density=0.1, rounds=3), r"once per round \(rounds=3\)"),
        (GraSPConfig(density=0.1), r"twice \(for g, then for H g\)"),
        (GraSPAbsConfig(density=0.1), r"twice \(for g, then for H g\)"),
        (FISHConfig(density=0.1, num_samples=4, update_frequency=2), "again every update_frequency=2 steps"),
    ],
    ids=["force", "grasp", "grasp_abs", "fish-rescoring"],
)
def test_criteria_that_read_the_data_again_refuse_a_generator_up_front(config, reads) -> None:
    taken: list = []
    with pytest.raises(ValueError, match=rf"reads calibration_data {reads}, and a generator can be read only once"):
        _masks(config, _one_shot(_batches(), taken))
    assert taken == [], "nothing may be read before the refusal"


@pytest.mark.parametrize(
    "config",
    [SNIPConfig(density=0.1), FORCEConfig(density=0.1, rounds=1), SynFlowConfig(density=0.1, rounds=3)],
    ids=["snip", "force-one-round", "synflow"],
)
def test_criteria_that_read_the_data_once_take_a_generator(config) -> None:
    _assert_same(_masks(config, _one_shot(_batches(), [])), _masks(config, _batches()))


def test_a_dataset_gives_synflow_its_input_shape() -> None:
    config = SynFlowConfig(density=0.1, rounds=2)
    _assert_same(_masks(config, datasets.Dataset.from_list(_rows())), _masks(config, _batches(8)))


def test_data_in_unusable_shapes_is_refused_naming_calibration_data(caplog) -> None:
    snip = SNIPConfig(density=0.1)
    with pytest.raises(ValueError, match=r"calibration_data is a dict \(keys \['input_ids', 'labels'\]\).*pass \["):
        _masks(snip, _batches()[0])
    with pytest.raises(ValueError, match="calibration_data has type int; pass an iterable of batches"):
        _masks(snip, 3)
    with pytest.raises(ValueError, match="calibration_data gave batches of type str, not dicts of model inputs"):
        _masks(snip, ["a sentence", "another"])
    with pytest.raises(ValueError, match=r"is empty \(an iterator that was read before is empty"):
        exhausted = _one_shot(_batches(), [])
        list(exhausted)
        _masks(snip, exhausted)
    with caplog.at_level(logging.WARNING, logger="drt_peft"):
        _masks(snip, _batches(), calibration_batch_size=4)
    assert "calibration_batch_size and data_collator apply to rows" in caplog.text


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_scoring_shows_a_progress_bar_on_a_terminal_only(monkeypatch) -> None:
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    _masks(SNIPConfig(density=0.1), _batches(4))
    assert "snip scoring" in terminal.getvalue() and "4/4" in terminal.getvalue()
    _masks(FISHConfig(density=0.1, num_samples=6), _batches(4))
    assert "fish scoring" in terminal.getvalue() and "6/6" in terminal.getvalue()
    _masks(FORCEConfig(density=0.1, rounds=2), _batches(4))
    assert "force rounds" in terminal.getvalue() and "2/2" in terminal.getvalue()

    drt_peft.logging.disable_progress_bar()
    try:
        assert not drt_peft.logging.is_progress_bar_enabled()
        silenced = _Terminal()
        monkeypatch.setattr(sys, "stderr", silenced)
        _masks(SNIPConfig(density=0.1), _batches(4))
        assert silenced.getvalue() == ""
    finally:
        drt_peft.logging.enable_progress_bar()
    assert drt_peft.logging.is_progress_bar_enabled()
    not_a_terminal = io.StringIO()
    monkeypatch.setattr(sys, "stderr", not_a_terminal)
    _masks(SNIPConfig(density=0.1), _batches(4))
    assert not_a_terminal.getvalue() == ""


def test_batches_reach_the_model_device() -> None:
    batch = {"input_ids": torch.ones(2, 3), "nested": [torch.ones(1), "text"], "pair": (torch.ones(1), 3)}
    moved = to_device(batch, torch.device("meta"))
    assert moved["input_ids"].is_meta and moved["nested"][0].is_meta and moved["pair"][0].is_meta
    assert moved["nested"][1] == "text" and moved["pair"][1] == 3 and isinstance(moved["pair"], tuple)
    assert to_device(batch, torch.device("cpu")) is batch, "a batch already on the device stays as it is"
