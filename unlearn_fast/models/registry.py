"""Name -> constructor registry for model families and sizes (as timm's ``create_model``)."""
from __future__ import annotations

import difflib
import inspect
import re
import sys
from typing import Callable, Dict, List, Optional

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
    """Build a registered model: ``create_model("mae_micro")``, ``create_model("mage", depth=2)``.

    ``name``: one of :func:`list_models` (a ValueError names them); ``kwargs``: the model class's constructor
    arguments (an unknown one is a TypeError that lists those the model accepts). The model is built on torch's
    current default device and dtype, with fresh random weights (load a checkpoint into it to unlearn it)."""
    _import_families()
    if not isinstance(name, str) or name not in _REGISTRY:
        near = difflib.get_close_matches(name.lower(), [n.lower() for n in _REGISTRY], n=1) \
            if isinstance(name, str) else []
        hint = f" (did you mean {next(n for n in _REGISTRY if n.lower() == near[0])!r}?)" if near else ""
        raise ValueError(f"unknown model {name!r}{hint}; registered models: {', '.join(sorted(_REGISTRY))}")
    try:
        return _REGISTRY[name](**kwargs)
    except TypeError as e:  # name the model the keyword was meant for, and what it takes
        bad = re.search(r"unexpected keyword argument '(\w+)'", str(e))
        if bad:
            raise TypeError(f"create_model({name!r}): {_unknown_keyword(_REGISTRY[name], str(e), bad.group(1))}"
                            ) from e
        raise


def _unknown_keyword(fn: Callable, message: str, keyword: str) -> str:
    """``message`` plus the constructor keywords of the class it names (looked up in ``fn``'s module)."""
    owner = re.search(r"(\w+)\.__init__\(\)", message)
    cls = getattr(sys.modules.get(fn.__module__), owner.group(1), None) if owner else None
    accepted = _keywords(cls) if inspect.isclass(cls) else None
    if not accepted:
        return message
    near = difflib.get_close_matches(keyword, accepted, n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    return f"unknown keyword {keyword!r}{hint}; {cls.__name__} accepts: {', '.join(accepted)}"


def _keywords(cls) -> Optional[List[str]]:
    try:
        params = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):
        return None
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _import_families():
    # Families register on import; importing here keeps `create_model` usable without extra imports.
    import importlib
    for mod in ("mae", "mage", "palette"):
        try:
            importlib.import_module(f"unlearn_fast.models.{mod}")
        except ModuleNotFoundError as e:  # a family not written yet
            if e.name != f"unlearn_fast.models.{mod}":
                raise
