"""Integer models converted from timm (each family registers its converter where it is defined)."""

from . import eva, swin, vit, vit_relpos  # noqa: F401  (registers the converters)
from .base import QModel
from .factory import CUSTOM_MODELS, converter_for, create_model, load_timm_checkpoint, register_converter
from .support import list_models, list_supported

__all__ = ["QModel", "CUSTOM_MODELS", "converter_for", "create_model", "list_models", "load_timm_checkpoint",
           "register_converter", "list_supported"]
