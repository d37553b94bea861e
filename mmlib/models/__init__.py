"""Networks: encoders, autoencoders for self-supervised pretraining, image-tabular models, survival fusion, UMEML, MoRE."""

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
from mmlib.models.more import ECGTransformer, TransformerEncoder, XrayViT
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
    "ECGTransformer",
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
    "TransformerEncoder",
    "UMEML",
    "UnimodalSurvival",
    "ViTAutoEnc",
    "ViTEncoder",
    "ViTMLP",
    "XrayViT",
]
