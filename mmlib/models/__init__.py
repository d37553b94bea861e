"""Networks: encoders, autoencoders for self-supervised pretraining, image-tabular fusion models."""

from mmlib.models.autoencoders import ResNetAutoEnc, ResNetEncoder, ViTAutoEnc, ViTEncoder
from mmlib.models.clip import (
    EnsembleClassifier,
    ImageTabularCLIP,
    InteractionModule,
    ProjectionHead,
    ResNet3dEncoder,
    TabularEncoder,
)
from mmlib.models.image_tabular import FusionMLP, ImageTabularRegressor, ResNetMLP, TabularMLP, ViTMLP

__all__ = [
    "EnsembleClassifier",
    "FusionMLP",
    "ImageTabularCLIP",
    "ImageTabularRegressor",
    "InteractionModule",
    "ProjectionHead",
    "ResNet3dEncoder",
    "ResNetAutoEnc",
    "ResNetEncoder",
    "ResNetMLP",
    "TabularEncoder",
    "TabularMLP",
    "ViTAutoEnc",
    "ViTEncoder",
    "ViTMLP",
]
