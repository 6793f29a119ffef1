"""Calibration data for data-driven criteria: its accepted shapes, batches, losses and lean gradient passes.

``calibration_data`` is an iterable of batches (a list, a ``DataLoader``), a ``datasets.Dataset`` or
``IterableDataset``, or an iterable of rows (dicts of one example each); :class:`CalibrationData`
collates rows into batches. Every batch reaches the model on the model's device.

Scores are computed in eval mode (dropout off) so the same data gives the same mask on every
process, with gradients taken for the targeted weights only (every other parameter is
temporarily frozen), one backward at a time, accumulated in place.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import logging
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..logging import progress_bar
from ..validation import check_int
from .scoring import LossFn, ScoringContext

logger = logging.getLogger(__name__)

#: Rows per batch when ``calibration_data`` holds rows (the ``Trainer``'s default evaluation batch size).
DEFAULT_CALIBRATION_BATCH_SIZE = 8

ACCEPTED = (
    "an iterable of batches (a list or DataLoader of dicts of model inputs with labels, or batches of any form "
    "with loss_fn=...), a datasets.Dataset or IterableDataset, or a list of rows (dicts of one example each)"
)

_LABEL_KEYS = ("label", "labels", "label_ids")
_END = object()


def is_dataset(data: Any) -> bool:
    """Whether ``data`` is a ``datasets.Dataset`` or ``IterableDataset`` (``datasets`` is not imported for this:
    without it, nothing is one)."""
    datasets = sys.modules.get("datasets")
    return datasets is not None and isinstance(data, (datasets.Dataset, datasets.IterableDataset))


def is_example(element: Any) -> bool:
    """Whether a dict is one example rather than a batch: it holds python lists or numbers (as rows of a
    ``datasets.Dataset`` do), a 1-d ``input_ids`` or a 0-d label."""
    if not isinstance(element, Mapping):
        return False
    for key, value in element.items():
        if isinstance(value, (list, int, float)) and not isinstance(value, bool):
            return True
        ndim = getattr(value, "ndim", None)
        if (key == "input_ids" and ndim == 1) or (key in _LABEL_KEYS and ndim == 0):
            return True
    return False


def model_inputs(model: nn.Module) -> set[str] | None:
    """The keywords ``model.forward`` names, label names included (None if it takes keywords only as ``**kwargs``)."""
    try:
        parameters = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    names = {p.name for p in parameters if p.kind in kinds}
    return names | set(_LABEL_KEYS) if names else None


class CalibrationData:
    """``calibration_data`` as batches of model inputs.

    Rows are collated ``batch_size`` at a time by ``data_collator`` (default: transformers'
    ``default_data_collator``, which also renames ``label`` to ``labels``): always the rows of a
    ``datasets.Dataset`` or ``IterableDataset``, and, when the model computes the loss (no
    ``loss_fn``), elements that :func:`is_example` finds to be single examples. Before that, as the
    ``Trainer`` does, the model's rows lose the columns its ``forward`` does not take (a ``text``
    column, say). Anything else passes as it is. Each pass reads the source again, so this can be
    read as often as the source can.
    """

    def __init__(
        self, source: Iterable[Any], batch_size: int | None = None, data_collator: Callable | None = None
    ) -> None:
        if isinstance(source, Mapping):
            raise ValueError(
                f"calibration_data is a dict (keys {list(source)[:6]}): one batch or a table of columns, not an "
                f"iterable of batches; pass [batch], or {ACCEPTED}"
            )
        if isinstance(source, (str, bytes)) or not isinstance(source, Iterable):
            raise ValueError(f"calibration_data has type {type(source).__name__}; pass {ACCEPTED}")
        check_int("calibration_batch_size", batch_size, optional=True)
        self.source = source
        self.batch_size = batch_size or DEFAULT_CALIBRATION_BATCH_SIZE
        self.data_collator = data_collator
        self._said: set[str] = set()  # what has been logged once already
        if batch_size is None and data_collator is None:
            self._said.add("batches")

    @property
    def one_shot(self) -> bool:
        """Whether the source is an iterator (a generator, ...), which can be read only once."""
        return isinstance(self.source, Iterator)

    def batches(self, model: nn.Module | None = None) -> Iterator[Any]:
        """One pass over the batches; ``model``: the model that takes them as ``model(**batch)``, None when a
        ``loss_fn`` takes them."""
        elements = iter(self.source)
        first = next(elements, _END)
        if first is _END:
            return
        elements = itertools.chain([first], elements)
        if is_dataset(self.source) or (model is not None and is_example(first)):
            yield from self._collated(elements, None if model is None else model_inputs(model))
            return
        self._say_once(
            "batches",
            "calibration_batch_size and data_collator apply to rows; calibration_data holds batches (a %s of %s), "
            "which are used as they are",
            type(self.source).__name__,
            type(first).__name__,
            level=logging.WARNING,
        )
        yield from elements

    def num_batches(self, model: nn.Module | None = None) -> int | None:
        """How many batches a pass gives, where the source has a length (else None)."""
        try:
            size = len(self.source)  # type: ignore[arg-type]
        except TypeError:
            return None
        if is_dataset(self.source):
            rows = True
        else:  # a DataLoader, or any sized iterable that is not a sequence, is taken to give batches
            rows = model is not None and isinstance(self.source, Sequence) and size > 0 and is_example(self.source[0])
        return -(-size // self.batch_size) if rows else size

    def _collated(self, rows: Iterator[Any], keep: set[str] | None) -> Iterator[Any]:
        """Batches of ``batch_size`` rows, each row first limited to the keys in ``keep`` (None: all)."""
        if self.data_collator is None:
            from transformers import default_data_collator as collate
        else:
            collate = self.data_collator
        while chunk := list(itertools.islice(rows, self.batch_size)):
            if keep is not None and isinstance(chunk[0], Mapping):
                if unused := sorted(set(chunk[0]) - keep):
                    self._say_once(
                        "unused", "calibration_data columns that the model does not take, ignored: %s", unused
                    )
                chunk = [{k: v for k, v in row.items() if k in keep} for row in chunk]
            try:
                batch = collate(chunk)
            except (ValueError, TypeError, RuntimeError) as error:
                raise ValueError(
                    f"calibration_data rows could not be collated into a batch by "
                    f"{getattr(collate, '__name__', type(collate).__name__)} ({error}); rows of different lengths "
                    "need padding: pass data_collator=DataCollatorWithPadding(tokenizer) to get_drt_model"
                ) from error
            yield batch

    def _say_once(self, key: str, message: str, *args: Any, level: int = logging.INFO) -> None:
        if key not in self._said:
            self._said.add(key)
            logger.log(level, message, *args)


def as_calibration_data(
    data: Iterable[Any] | None, batch_size: int | None = None, data_collator: Callable | None = None
) -> CalibrationData | None:
    """``data`` as :class:`CalibrationData` (None stays None, and so does a :class:`CalibrationData` when no
    option is given), ``calibration_batch_size`` checked either way."""
    check_int("calibration_batch_size", batch_size, optional=True)
    if data is None or (isinstance(data, CalibrationData) and batch_size is None and data_collator is None):
        return data
    return CalibrationData(data.source if isinstance(data, CalibrationData) else data, batch_size, data_collator)


def target_density(scoring: ScoringContext) -> float:
    """The config's density, or ``num_trainable`` over the targets' size."""
    config = scoring.config
    if config.density is not None:
        return config.density
    return config.num_trainable / sum(t.weight.numel() for t in scoring.targets)


def model_device(model: nn.Module) -> torch.device | None:
    """Where the model takes its inputs: ``model.device`` (transformers), else its first parameter's device."""
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next((p.device for p in model.parameters()), None)


def to_device(batch: Any, device: torch.device | None) -> Any:
    """``batch`` with its tensors (also inside dicts, lists and tuples) on ``device``, as the ``Trainer`` moves
    them; a batch already there is returned as it is."""
    if device is None:
        return batch
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        moved = {k: to_device(v, device) for k, v in batch.items()}
        return batch if all(moved[k] is v for k, v in batch.items()) else type(batch)(moved)
    if isinstance(batch, (list, tuple)) and not hasattr(batch, "_fields"):
        items = [to_device(v, device) for v in batch]
        return batch if all(a is b for a, b in zip(items, batch, strict=True)) else type(batch)(items)
    return batch


def calibration_batches(
    scoring: ScoringContext, limit: int | None = None, progress: str | None = None
) -> Iterator[Any]:
    """Up to ``limit`` batches of ``calibration_data`` on the model's device; raises if there is none.

    ``progress`` is the description of a progress bar over the pass (None: no bar).
    """
    name = scoring.config.method_name
    if scoring.calibration_data is None:
        raise ValueError(
            f"method {name!r} scores weights on data: pass calibration_data=... to get_drt_model: {ACCEPTED}"
        )
    data = as_calibration_data(scoring.calibration_data)
    takes = scoring.model if scoring.loss_fn is None else None
    total = data.num_batches(takes)
    if limit is not None:
        total = limit if total is None else min(total, limit)
    device = model_device(scoring.model)
    count = 0
    with progress_bar(desc=progress, total=total, unit="batch", enabled=progress is not None) as bar:
        for batch in itertools.islice(data.batches(takes), limit):
            yield to_device(batch, device)
            count += 1
            bar.update()
    if count == 0:
        read = " (an iterator that was read before is empty: pass a list or a re-iterable)" if data.one_shot else ""
        raise ValueError(f"calibration_data for method {name!r} is empty{read}; pass at least one batch")


def require_reiterable(scoring: ScoringContext, reads: str) -> None:
    """Refuse ``calibration_data`` that can be read only once (a generator) before a criterion that reads it
    more than once (``reads``: how often) starts."""
    data = as_calibration_data(scoring.calibration_data)
    if data is not None and data.one_shot:
        raise ValueError(
            f"method {scoring.config.method_name!r} reads calibration_data {reads}, and a "
            f"{type(data.source).__name__} can be read only once; pass a list of batches (list(...) of it), a "
            "DataLoader or a datasets.Dataset"
        )


def batch_loss(model: nn.Module, batch: Any, loss_fn: LossFn | None, temperature: float = 1.0) -> Tensor:
    """``loss_fn(model, batch)``, or the ``.loss`` of ``model(**batch)`` for dict batches.

    With a ``temperature`` T other than 1 (GraSP's, Wang et al. 2020) the loss is that of the logits divided
    by T: ``loss_fn(model, batch, temperature=T)``, or the model's loss recomputed by :func:`tempered_loss`.
    """
    if loss_fn is not None:
        return loss_fn(model, batch) if temperature == 1 else loss_fn(model, batch, temperature=temperature)
    if not isinstance(batch, Mapping):
        raise ValueError(
            f"calibration_data gave batches of type {type(batch).__name__}, not dicts of model inputs; pass dicts "
            "for model(**batch) with labels (batched tensors, or rows: a datasets.Dataset, dicts of lists), "
            "or loss_fn=lambda model, batch: ... to get_drt_model"
        )
    output = model(**batch)
    loss = _field(output, "loss")
    if loss is None:
        raise ValueError(
            "the model output has no loss: add labels to the calibration batches, "
            "or pass loss_fn=lambda model, batch: ... to get_drt_model"
        )
    return loss if temperature == 1 else tempered_loss(model, output, batch.get("labels"), loss, temperature)


def _field(output: Any, name: str) -> Any:
    """``output[name]`` of a dict output, ``output.name`` of a ``ModelOutput`` (None if it has none)."""
    return output.get(name) if isinstance(output, Mapping) else getattr(output, name, None)


def tempered_loss(model: nn.Module, output: Any, labels: Tensor | None, loss: Tensor, temperature: float) -> Tensor:
    """The model's loss recomputed from its logits divided by ``temperature``.

    transformers computes the loss inside ``forward``, so it is recomputed here from ``output.logits / T``
    and the labels: cross-entropy for integer labels (sequence, token and image classification, masked LM;
    causal LMs, models that generate without an encoder-decoder split, shift the labels by one as transformers
    does; -100 is ignored) and binary cross-entropy for float labels shaped like the logits (multi-label
    classification). The rule must give back the model's own ``loss`` at T = 1, else this raises: other
    losses (regression, label smoothing, auxiliary terms) need a ``loss_fn`` that applies T itself.
    """
    logits = _field(output, "logits")
    generates = getattr(model, "can_generate", lambda: False)()
    shift = generates and not getattr(getattr(model, "config", None), "is_encoder_decoder", False)

    def rule(z: Tensor) -> Tensor | None:
        z = z if z.dtype == torch.float64 else z.float()  # half-precision logits upcast, as transformers does
        if labels.is_floating_point():  # multi-label classification, or a loss this cannot recompute
            return (
                nn.functional.binary_cross_entropy_with_logits(z, labels.to(z.dtype))
                if labels.shape == z.shape
                else None
            )
        z, target = (z[..., :-1, :], labels[..., 1:]) if shift else (z, labels)
        try:
            return nn.functional.cross_entropy(z.reshape(-1, z.shape[-1]), target.reshape(-1), ignore_index=-100)
        except (RuntimeError, ValueError, IndexError):
            return None

    own = rule(logits.detach()) if isinstance(logits, Tensor) and isinstance(labels, Tensor) else None
    tolerance = max(1e-5, 4 * torch.finfo(loss.dtype).eps) if loss.is_floating_point() else 0.0
    if own is None or not torch.allclose(own, loss.detach().to(own.dtype), rtol=tolerance, atol=tolerance):
        found = "" if own is None else f" ({float(own):.6g})"
        raise ValueError(
            f"temperature={temperature} divides the logits, but the model's loss ({float(loss.detach()):.6g}) is not "
            f"the cross-entropy of its `logits` and `labels`{found}, so it cannot be recomputed from logits / "
            "temperature; pass loss_fn=lambda model, batch, temperature: ... to get_drt_model, or temperature=1.0"
        )
    return rule(logits / temperature)


def check_tempered_loss_fn(scoring: ScoringContext, temperature: float) -> None:
    """Refuse, before any data is read, a ``loss_fn`` that cannot take the ``temperature`` it must apply."""
    if scoring.loss_fn is None or temperature == 1:
        return
    try:
        parameters = inspect.signature(scoring.loss_fn).parameters.values()
    except (TypeError, ValueError):
        parameters = []
    takes = any(
        p.kind == inspect.Parameter.VAR_KEYWORD
        or (p.name == "temperature" and p.kind != inspect.Parameter.POSITIONAL_ONLY)
        for p in parameters
    )
    if not takes:
        raise ValueError(
            f"method {scoring.config.method_name!r} scores the loss of logits / temperature "
            f"(temperature={temperature}), which a loss_fn computes itself: give it a `temperature` parameter, "
            "loss_fn=lambda model, batch, temperature: cross_entropy(model(batch[0]) / temperature, batch[1]), "
            "or set temperature=1.0 in the config"
        )


def split_samples(batch: Any) -> Iterator[Any]:
    """The single examples of a batch (dict or tuple/list of tensors sharing dim 0)."""
    if isinstance(batch, Mapping):
        size = len(next(v for v in batch.values() if isinstance(v, Tensor)))
        for i in range(size):
            yield {k: v[i : i + 1] if isinstance(v, Tensor) else v for k, v in batch.items()}
    elif isinstance(batch, Sequence) and not isinstance(batch, str):
        size = len(next(v for v in batch if isinstance(v, Tensor)))
        for i in range(size):
            yield type(batch)(v[i : i + 1] if isinstance(v, Tensor) else v for v in batch)
    else:
        raise ValueError(f"cannot split a {type(batch).__name__} batch into samples; use dicts or tuples of tensors")


@contextlib.contextmanager
def scoring_mode(model: nn.Module, weights: Sequence[Tensor]) -> Iterator[None]:
    """Eval mode, gradients enabled for ``weights`` only; everything restored afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
        with torch.enable_grad():
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


@contextlib.contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Switch a transformers model to eager attention (fused CPU attention has no double backward)."""
    config = getattr(model, "config", None)
    previous = getattr(config, "_attn_implementation", None)
    switch = hasattr(model, "set_attn_implementation") and previous not in (None, "eager")
    if switch:
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if switch:
            model.set_attn_implementation(previous)


def mean_gradients(
    scoring: ScoringContext,
    weights: Sequence[Tensor],
    limit: int | None,
    progress: str | None = None,
    temperature: float = 1.0,
) -> list[Tensor]:
    """Mean over calibration batches of ∂L/∂w for each of ``weights`` (one backward per batch; ``progress``:
    the description of a progress bar, None for none; ``temperature``: see :func:`batch_loss`)."""
    sums = [torch.zeros_like(w, dtype=torch.float32) for w in weights]
    count = 0
    for batch in calibration_batches(scoring, limit, progress):
        loss = batch_loss(scoring.model, batch, scoring.loss_fn, temperature)
        grads = torch.autograd.grad(loss, weights, allow_unused=True)
        for total, grad in zip(sums, grads, strict=True):
            if grad is not None:
                total.add_(grad)
        count += 1
    return [s / count for s in sums]
