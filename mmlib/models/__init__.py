"""Networks: encoders, autoencoders for self-supervised pretraining, image-tabular models, survival fusion."""

from mmlib.models.autoencoders import ResNetAutoEnc, ResNetEncoder, ViTAutoEnc, ViTEncoder
from mmlib.models.clip import (
    EnsembleClassifier,
    ImageTabularCLIP,
    InteractionModule,
    ProjectionHead,
    ResNet3dEncoder,
    TabularEncoder,
)
from mmlib.models.fusion import (
    CoAttentionFusion,
    ContrastiveFusion,
    CrossAttentionFusion,
    LateFusion,
    UnimodalSurvival,
)
from mmlib.models.image_tabular import FusionMLP, ImageTabularRegressor, ResNetMLP, TabularMLP, ViTMLP

__all__ = [
    "CoAttentionFusion",
    "ContrastiveFusion",
    "CrossAttentionFusion",
    "EnsembleClassifier",
    "FusionMLP",
    "ImageTabularCLIP",
    "ImageTabularRegressor",
    "InteractionModule",
    "LateFusion",
    "ProjectionHead",
    "ResNet3dEncoder",
    "ResNetAutoEnc",
    "ResNetEncoder",
    "ResNetMLP",
    "TabularEncoder",
    "TabularMLP",
    "UnimodalSurvival",
    "ViTAutoEnc",
    "ViTEncoder",
    "ViTMLP",
]
