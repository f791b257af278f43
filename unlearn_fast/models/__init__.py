"""Model families behind one adapter protocol (:mod:`unlearn_fast.models.adapter`)."""
from .adapter import I2IModel, TaskDraw
from .registry import create_model, list_models, register_model

__all__ = ["I2IModel", "TaskDraw", "create_model", "list_models", "register_model"]
