"""Name -> constructor registry for model families and sizes (as timm's ``create_model``)."""
from __future__ import annotations

from typing import Callable, Dict, List

_REGISTRY: Dict[str, Callable] = {}


def register_model(fn: Callable = None, *, name: str = None):
    """Decorator: ``@register_model`` registers ``fn`` under its own name (or ``name``)."""
    def wrap(f):
        key = name or f.__name__
        if key in _REGISTRY and _REGISTRY[key] is not f:
            raise ValueError(f"model {key!r} is registered twice")
        _REGISTRY[key] = f
        return f
    return wrap(fn) if fn is not None else wrap


def list_models() -> List[str]:
    _import_families()
    return sorted(_REGISTRY)


def create_model(name: str, **kwargs):
    """Build a registered model: ``create_model("mae_micro")``, ``create_model("mage", depth=2)``."""
    _import_families()
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(sorted(_REGISTRY))}")
    try:
        return _REGISTRY[name](**kwargs)
    except TypeError as e:  # name the model the keyword was meant for, not only its class
        if "unexpected keyword argument" in str(e):
            raise TypeError(f"create_model({name!r}): {e}") from e
        raise


def _import_families():
    # Families register on import; importing here keeps `create_model` usable without extra imports.
    import importlib
    for mod in ("mae", "mage", "palette"):
        try:
            importlib.import_module(f"unlearn_fast.models.{mod}")
        except ModuleNotFoundError as e:  # a family not written yet
            if e.name != f"unlearn_fast.models.{mod}":
                raise
