from . import encouraging_loss  # noqa: F401
