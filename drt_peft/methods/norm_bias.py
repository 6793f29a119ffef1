"""Norm-/bias-only training (Frankle et al. 2021; BitFit, Ben Zaken et al. 2022): no weight matrix trains."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..config import DRTConfig, Paper, register_method
from ..targeting import NORM_TYPES, find_modules_to_save, find_targets, is_normalisation
from ..validation import check_choice

TRAIN_CHOICES = ("norm", "bias", "norm_and_bias")


def is_norm_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a normalisation layer with affine parameters of its own.

    It must be an instance of one of :data:`NORM_TYPES` or have a class name ending in ``"Norm"``
    (transformers' ``LlamaRMSNorm``, ``T5LayerNorm``, ...), have a ``weight`` Parameter of its own
    (non-affine norms are skipped), and have no submodule holding parameters (so a composite
    module named ``...Norm`` never trains a layer inside it).
    """
    if not is_normalisation(module):
        return False
    if "weight" not in dict(module.named_parameters(recurse=False)):
        return False
    return all(next(child.parameters(), None) is None for child in module.children())


def norm_layer_names(model: nn.Module) -> list[str]:
    """Full names of the normalisation layers of ``model`` (see :func:`is_norm_layer`), in model order."""
    return [name for name, module in model.named_modules() if name and is_norm_layer(module)]


@register_method("norm_bias")
@dataclass(frozen=True)
class NormBiasConfig(DRTConfig):
    """Train only normalisation affine parameters and/or biases; every weight matrix stays frozen.

    Frankle, Schwab & Morcos, *Training BatchNorm and Only BatchNorm: On the Expressive Power of
    Random Features in CNNs* (ICLR 2021): only the affine γ, β of the normalisation layers train.
    Ben Zaken, Ravfogel & Goldberg, *BitFit: Simple Parameter-efficient Fine-tuning for
    Transformer-based Masked Language-models* (ACL 2022): only the bias terms train.

    In the survey's embedding ψ is empty for every targeted weight (no entry of a weight matrix
    trains). ``train`` chooses what does:

    - ``"bias"``: the biases of the targeted layers (``target_modules``, by default every Linear /
      Conv1D of the backbone; the ``bias="all"`` mechanism of :class:`~drt_peft.DRTLayer`);
    - ``"norm"``: the parameters of every normalisation layer of the model (:func:`is_norm_layer`:
      ``nn.LayerNorm``, ``nn.GroupNorm``, ``nn.RMSNorm``, ``nn.BatchNorm1d/2d/3d``,
      ``nn.SyncBatchNorm``, ``nn.InstanceNorm1d/2d/3d`` and any class whose name ends in ``"Norm"``,
      each only with a ``weight`` Parameter of its own and no parameterised submodule). They are
      added to ``modules_to_save`` when the model is built (:meth:`modules_to_save_for`), so they
      are stored in the adapter (BatchNorm running statistics included) and restored exactly by
      ``unload()``;
    - ``"norm_and_bias"`` (default): both.

    ``density`` and ``num_trainable`` have no meaning and must stay unset; ``bias`` follows
    ``train``. ``base_init="seeded"`` re-draws the targeted weights from ``seed``, the random-feature
    setting of Frankle et al.; a new task head still belongs in ``modules_to_save``.

    Example::

        config = NormBiasConfig(train="norm_and_bias", modules_to_save=["classifier"])
        model = get_drt_model(base_model, config)
    """

    paper = Paper(
        "Ben Zaken, Ravfogel & Goldberg",
        "BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based Masked Language-models",
        "ACL",
        2022,
    )

    sized_by_density = False

    train: str = field(
        default="norm_and_bias",
        metadata={
            "help": "What trains: 'norm' (the affine parameters of every normalisation layer), 'bias' (the biases "
            "of the targeted layers) or 'norm_and_bias' (both). No weight matrix trains."
        },
    )
    bias: str | None = field(
        default=None,
        metadata={
            "help": "Follows `train` (leave unset): 'all' when the targeted biases train ('bias', 'norm_and_bias'), "
            "'none' for 'norm'."
        },
    )

    @property
    def trains_norms(self) -> bool:
        """Whether the normalisation layers train (``train`` 'norm' or 'norm_and_bias')."""
        return self.train in ("norm", "norm_and_bias")

    @property
    def trains_biases(self) -> bool:
        """Whether the targeted biases train (``train`` 'bias' or 'norm_and_bias')."""
        return self.train in ("bias", "norm_and_bias")

    def __post_init__(self) -> None:
        check_choice("train", self.train, TRAIN_CHOICES)
        expected = "all" if self.trains_biases else "none"
        if self.bias is None:
            self._normalise("bias", expected)
        elif self.bias != expected:
            raise ValueError(
                f"bias={self.bias!r} contradicts train={self.train!r}; leave bias unset: it follows train "
                f"('all' for 'bias' and 'norm_and_bias', 'none' for 'norm')"
            )
        super().__post_init__()
        self.allow_only(
            "no entry of a weight matrix trains, so the weights stay as they are",
            mode="freeze",
            budget="uniform",
            structure="unstructured",
        )

    def modules_to_save_for(self, model: nn.Module) -> list[str]:
        """``modules_to_save`` plus, with ``train`` 'norm' or 'norm_and_bias', every normalisation layer.

        Raises when ``train`` asks for normalisation layers or biases that ``model`` does not have.
        """
        names = list(self.modules_to_save or [])
        if self.trains_norms:
            norms = norm_layer_names(model)
            if not norms:
                raise ValueError(
                    f"train={self.train!r}: {type(model).__name__} has no normalisation layer with affine parameters "
                    f"(matched: {', '.join(t.__name__ for t in NORM_TYPES)} or a class name ending in 'Norm'); "
                    "use train='bias'"
                )
            names += norms
        if self.trains_biases:
            modules = dict(model.named_modules())
            targets = find_targets(model, self.target_modules, exclude=find_modules_to_save(model, names))
            if all(modules[name].bias is None for name in targets):
                raise ValueError(
                    f"train={self.train!r}: none of the {len(targets)} modules that target_modules="
                    f"{self.target_modules!r} selects has a bias; use train='norm' or target layers with biases"
                )
        return names
