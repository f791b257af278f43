"""unlearn_fast: fast machine unlearning for image-to-image generative models.

A drop-in, faster replacement for the trainer of Li, Hsu, Chen, Marculescu, "Machine Unlearning for
Image-to-Image Generative Models" (ICLR 2024). See README.md.

    import unlearn_fast
    model = unlearn_fast.create_model("mae_micro")
    retain_loss, forget_loss = unlearn_fast.ops.retain_forget_l2_loss(latent, guide, noise_guide, is_forget)
"""
__version__ = "0.1.0"

from . import ops  # noqa: E402
from .models import create_model, list_models  # noqa: E402

__all__ = ["ops", "create_model", "list_models", "__version__"]
