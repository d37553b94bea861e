"""Networks: encoders, autoencoders for self-supervised pretraining, image-tabular models, survival fusion, UMEML."""

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
from mmlib.models.umeml import (
    UMEML,
    GenomicEncoder,
    GenomicsOnly,
    MCATFusion,
    PatchCNN,
    PathologyEncoder,
    PathologyOnly,
    SimpleFusion,
)

__all__ = [
    "CoAttentionFusion",
    "ContrastiveFusion",
    "CrossAttentionFusion",
    "EnsembleClassifier",
    "FusionMLP",
    "GenomicEncoder",
    "GenomicsOnly",
    "ImageTabularCLIP",
    "ImageTabularRegressor",
    "InteractionModule",
    "LateFusion",
    "MCATFusion",
    "PatchCNN",
    "PathologyEncoder",
    "PathologyOnly",
    "ProjectionHead",
    "ResNet3dEncoder",
    "ResNetAutoEnc",
    "ResNetEncoder",
    "ResNetMLP",
    "SimpleFusion",
    "TabularEncoder",
    "TabularMLP",
    "UMEML",
    "UnimodalSurvival",
    "ViTAutoEnc",
    "ViTEncoder",
    "ViTMLP",
]
