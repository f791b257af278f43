"""unlearn_fast: fast machine unlearning for image-to-image generative models.

A drop-in, faster replacement for the trainer of Li, Hsu, Chen, Marculescu, "Machine Unlearning for
Image-to-Image Generative Models" (ICLR 2024). See README.md.

    import unlearn_fast
    model = unlearn_fast.create_model("mae_micro")
    retain_loss, forget_loss = unlearn_fast.ops.retain_forget_l2_loss(latent, guide, noise_guide, is_forget)
"""
__version__ = "0.1.0"

__all__ = ["ops", "create_model", "list_models", "__version__"]


def __getattr__(name: str):
    # torch is imported on first use, not by `import unlearn_fast`: the `unlearn-fast` command's Ctrl-C handler is
    # then in place before the few seconds of torch's import start
    import importlib  # not `from . import`: its attribute lookup would come back here
    if name == "ops":
        return importlib.import_module(f"{__name__}.ops")
    if name in ("create_model", "list_models"):
        return getattr(importlib.import_module(f"{__name__}.models"), name)
    raise AttributeError(f"module 'unlearn_fast' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
