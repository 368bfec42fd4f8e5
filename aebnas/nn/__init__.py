"""Layers and the early-exit network built from an ``ArchConfig``'s rows."""

from ..config import make_divisible
from .blocks import ConvBNAct, InvertedResidual, SqueezeExcite, build_head, build_stem, init_weights, se_channels
from .confidence import torch_confidence
from .elastic import ElasticEarlyExitNet, covers, extract
from .exits import ExitBranch, ExitModule, Resize, resize_bicubic
from .network import EarlyExitNet

__all__ = ["ConvBNAct", "InvertedResidual", "SqueezeExcite", "make_divisible", "ExitBranch",
           "ExitModule", "EarlyExitNet", "torch_confidence", "ElasticEarlyExitNet", "covers",
           "extract", "build_stem", "build_head", "init_weights", "se_channels", "Resize",
           "resize_bicubic"]
