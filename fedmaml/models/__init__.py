"""Models with declared layer groups. ``build_model`` maps the config's ``model`` section to one."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence, Union

from fedmaml.errors import ConfigError
from fedmaml.models.base import ModuleStage, StagedModel, Stage
from fedmaml.models.conv4 import conv4, conv4_module
from fedmaml.models.mlp import mlp, mlp_module
from fedmaml.models.module import ModuleModel, is_user_model, module_model

if TYPE_CHECKING:  # an annotation only: models stay usable without the config package
    from fedmaml.config.schema import ModelConfig

__all__ = ["Model", "StagedModel", "Stage", "ModuleStage", "ModuleModel", "mlp", "conv4",
           "mlp_module", "conv4_module", "build_model"]

#: What the core and the engines take: a module (built-in or a user's) or a hand-written
#: StagedModel (the low-level API); both have the same interface.
Model = Union[StagedModel, ModuleModel]


def build_model(spec: ModelConfig, input_shape: Sequence[int], num_outputs: int,
                data: str | None = None) -> Model:
    """Build the model named by ``spec.name`` (the config's ``model`` section) for a data set:
    a built-in, or a user's ``torch.nn.Module`` ("package.module:factory"; fedmaml/models/module.py).
    ``data`` names that data set in error messages (``data.family=sinusoid``)."""
    if is_user_model(spec.name):
        return module_model(spec, input_shape, num_outputs, data=data)
    if spec.name == "mlp":
        return mlp(input_shape, list(spec.hidden), num_outputs)
    if spec.name == "linear":  # one layer group: the MLP without hidden layers
        return mlp(input_shape, [], num_outputs)
    if spec.name == "conv4":
        if len(input_shape) != 3:
            raise ConfigError(f"model.name: conv4 needs image data [channels, height, width], but "
                              f"the data has inputs of shape {list(input_shape)}; use model.name: mlp")
        return conv4(input_shape, num_outputs, width=spec.conv_width, strided=spec.conv_strided)
    raise ConfigError(f"model.name: unknown model {spec.name!r}; allowed: mlp, conv4, linear, "
                      "or an import path 'package.module:factory' of your own torch.nn.Module")
