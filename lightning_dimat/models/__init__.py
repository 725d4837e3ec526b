"""Networks (a registry YAML can name) and the generic image-classifier LightningModule."""

from lightning_dimat.models.classifier import ImageClassifier
from lightning_dimat.models.registry import MODELS, build_model, register_model
from lightning_dimat.models.small import mlp, small_cnn

__all__ = ["MODELS", "ImageClassifier", "build_model", "mlp", "register_model", "small_cnn"]
