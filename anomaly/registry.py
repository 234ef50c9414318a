"""Model registry: every family of the zoo is registered here by name.

A family file decorates small factory functions with :func:`register_model`; the registry keeps
a :class:`ModelSpec` with metadata (objective, conditioning, paper) so that the CLI can list the
zoo and the tests can be parametrized over :func:`list_models` — adding a family adds its tests.

Example::

    from anomaly.registry import create_model, list_models
    model = create_model("aae", in_channels=1, image_size=64, latent_dim=32)
    print(list_models())
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

__all__ = ["ModelSpec", "register_model", "create_model", "list_models", "get_spec", "UnknownModelError"]


class UnknownModelError(KeyError):
    """Raised for a registry name that does not exist; the message lists the known names."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it readable
        return str(self.args[0])


@dataclass(frozen=True)
class ModelSpec:
    """Metadata for one registered model.

    Attributes:
        name: registry key, lowercase (``"aae"``).
        factory: callable ``factory(**kwargs) -> nn.Module``.
        objective: registry key of the training objective (see ``anomaly.training.objectives``).
        family: human name of the family (``"Adversarial autoencoder"``).
        paper: the paper that introduced it.
        conditional: whether the model takes an integer label ``cond``.
        reconstruction: how it maps ``x`` to ``x_hat`` (shown by ``anomaly models``).
        defaults: default keyword arguments, merged under the user's.
    """

    name: str
    factory: Callable[..., Any]
    objective: str
    family: str = ""
    paper: str = ""
    conditional: bool = False
    reconstruction: str = "directly"
    defaults: dict[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, ModelSpec] = {}
# Modules that hold @register_model factories. Imported lazily the first time the registry is
# read, so `import anomaly` stays cheap and torch-free.
_FAMILY_MODULES = ("anomaly.zoo.aae", "anomaly.zoo.autoencoder", "anomaly.zoo.gan", "anomaly.zoo.cyclegan")
_loaded = False


def register_model(
    name: str,
    *,
    objective: str,
    family: str = "",
    paper: str = "",
    conditional: bool = False,
    reconstruction: str = "directly",
    **defaults: Any,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator that registers a model factory under ``name``.

    Args:
        name: lowercase registry key; must be unique.
        objective: key of the objective that trains it.
        family, paper, conditional, reconstruction: metadata for listings and docs.
        **defaults: default keyword arguments for the factory.
    """
    if name != name.lower():
        raise ValueError(f"registry names are lowercase, got {name!r}")

    def wrap(factory: Callable[..., Any]) -> Callable[..., Any]:
        if name in _REGISTRY and _REGISTRY[name].factory is not factory:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = ModelSpec(
            name=name,
            factory=factory,
            objective=objective,
            family=family,
            paper=paper,
            conditional=conditional,
            reconstruction=reconstruction,
            defaults=dict(defaults),
        )
        return factory

    return wrap


def _load_families() -> None:
    global _loaded
    if _loaded:
        return
    for module in _FAMILY_MODULES:
        importlib.import_module(module)
    _loaded = True


def list_models() -> list[str]:
    """Return the sorted registry keys of every registered model."""
    _load_families()
    return sorted(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    """Return the :class:`ModelSpec` for ``name``; :class:`UnknownModelError` lists the choices."""
    _load_families()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownModelError(
            f"unknown model {name!r}; expected one of: {', '.join(sorted(_REGISTRY))}"
        ) from None


def create_model(name: str, **kwargs: Any) -> Any:
    """Build the registered model ``name`` with the spec's defaults overridden by ``kwargs``."""
    spec = get_spec(name)
    merged = {**spec.defaults, **kwargs}
    return spec.factory(**merged)
