"""The small protocol an image-to-image model family implements so the trainer knows no family.

An I2I model is an encoder plus a decoder. Unlearning trains the encoder path only and compares the
student's embedding of T(x) with the frozen teacher's. What the trainer needs from a family:

- ``sample_task(images, generator)``: every random draw of the task transform T for one batch (mask
  noise, mask rate, ...), as a :class:`TaskDraw`. Student and teacher then see the *same* T.
- ``prepare_inputs(images)``: the frozen front end (MAGE: the VQGAN tokenizer; MAE: identity). Split
  out so that student and teacher can share its output where that is exact.
- ``forward_encoder_task(inputs, task, prenorm=False)``: E(T(x)) -> ``[N, L, D]``. With
  ``prenorm=True`` the hidden state before the encoder's final LayerNorm (the fused loss applies that
  norm itself, so the teacher latent is never written to memory).
- ``encoder_final_norm()``: that final LayerNorm (or None if the family has none).
- ``encoder_parameter_names()``: the parameters the unlearning loss reaches.
- ``task_loss_terms(inputs, task, target=None)``: the family's own training loss per token, for the
  MAX LOSS / NOISY LABEL baselines: ``(loss [N, L'], weight [N, L'])``;
  ``task_loss_terms_of_outputs(outputs, inputs, task, target=None)`` the same loss of given
  ``forward_outputs`` (NOISY LABEL scores two targets on one forward, as the reference).
- ``task_target(inputs, task)`` / ``noisy_task_target(target, generator)``: the default training target
  and the NOISY LABEL replacement for it.
- ``forward_outputs(inputs, task)``: the decoder's full output (RETAIN LABEL compares it to the teacher's).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Iterable, Optional, Tuple

import torch
from torch import nn


class TaskDraw(dict):
    """Named tensors of one batch's task randomness; every tensor has the batch as dim 0.

    Non-tensor entries (e.g. a python float mask rate shared by the batch) are kept as they are.
    """

    def select(self, rows: torch.Tensor) -> "TaskDraw":
        """The draw restricted to ``rows`` (an index tensor), for running the teacher on a subset."""
        return TaskDraw({k: (v.index_select(0, rows) if torch.is_tensor(v) and v.dim() > 0 else v)
                         for k, v in self.items()})

    def to(self, device) -> "TaskDraw":
        return TaskDraw({k: (v.to(device) if torch.is_tensor(v) else v) for k, v in self.items()})


class I2IModel(ABC):
    """Mixin for an ``nn.Module`` of a registered family. State-dict keys stay the official ones."""

    family: str = "abstract"
    #: pixel range of images the model consumes; the forget noise is clamped to it.
    image_range: Tuple[float, float] = (0.0, 1.0)

    @abstractmethod
    def sample_task(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> TaskDraw:
        ...

    def prepare_inputs(self, images: torch.Tensor) -> Any:
        return images

    @abstractmethod
    def forward_encoder_task(self, inputs: Any, task: TaskDraw, prenorm: bool = False) -> torch.Tensor:
        ...

    def encoder_final_norm(self) -> Optional[nn.LayerNorm]:
        return None

    @abstractmethod
    def encoder_parameter_names(self) -> Iterable[str]:
        ...

    def encoder_parameters(self):
        names = set(self.encoder_parameter_names())
        return [p for n, p in self.named_parameters() if n in names]  # type: ignore[attr-defined]

    @abstractmethod
    def task_loss_terms(self, inputs: Any, task: TaskDraw, target: Optional[torch.Tensor] = None
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
        ...

    @abstractmethod
    def task_loss_terms_of_outputs(self, outputs: torch.Tensor, inputs: Any, task: TaskDraw,
                                   target: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        ...

    @abstractmethod
    def task_target(self, inputs: Any, task: TaskDraw) -> torch.Tensor:
        ...

    @abstractmethod
    def noisy_task_target(self, target: torch.Tensor, generator: Optional[torch.Generator] = None
                          ) -> torch.Tensor:
        ...

    @abstractmethod
    def forward_outputs(self, inputs: Any, task: TaskDraw) -> torch.Tensor:
        ...
