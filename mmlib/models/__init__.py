"""Networks: encoders, autoencoders for self-supervised pretraining, image-tabular fusion models."""

from mmlib.models.autoencoders import ResNetAutoEnc, ResNetEncoder, ViTAutoEnc, ViTEncoder
from mmlib.models.image_tabular import FusionMLP, ImageTabularRegressor, ResNetMLP, TabularMLP, ViTMLP

__all__ = [
    "FusionMLP",
    "ImageTabularRegressor",
    "ResNetAutoEnc",
    "ResNetEncoder",
    "ResNetMLP",
    "TabularMLP",
    "ViTAutoEnc",
    "ViTEncoder",
    "ViTMLP",
]
