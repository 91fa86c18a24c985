"""The model zoo: ``create(name, **kw)`` builds any model, ``available_models()`` lists the names.

Every model takes pixels in [0, 1], normalises them inside ``forward`` as ``(x - mean) / std`` (buffers
``model.mean``/``model.std`` of shape [1, C, 1, 1], identity by default), uses ``activation`` wherever a
ReLU would be, names its first convolution ``conv1`` and its first stage ``layer1`` (``block1`` for
WideResNets), and carries ``model.fastrobust_config``: a JSON-able dict such that
``create(**model.fastrobust_config)`` rebuilds the same architecture (``load_state_dict`` then works).

    >>> model = create("preactresnet18", num_classes=10, activation="silu",
    ...                mean=(0.4914, 0.4822, 0.4465), std=(0.2471, 0.2435, 0.2616))
"""

from fastrobust.models.activations import available_activations, make_activation
from fastrobust.models.base import NormalizedModel
from fastrobust.models.registry import (
    available_models,
    count_parameters,
    create,
    import_plugins,
    model_info,
    register,
    unregister,
)

__all__ = [
    "NormalizedModel",
    "available_activations",
    "available_models",
    "count_parameters",
    "create",
    "import_plugins",
    "make_activation",
    "model_info",
    "register",
    "unregister",
]
