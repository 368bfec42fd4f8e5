"""Layers and the early-exit network built from an ``ArchConfig``."""

from ..config import make_divisible
from .blocks import ConvBNAct, InvertedResidual, SqueezeExcite
from .confidence import torch_confidence
from .elastic import ElasticEarlyExitNet, covers, extract
from .exits import ExitBranch, ExitModule
from .network import EarlyExitNet

__all__ = ["ConvBNAct", "InvertedResidual", "SqueezeExcite", "make_divisible", "ExitBranch",
           "ExitModule", "EarlyExitNet", "torch_confidence", "ElasticEarlyExitNet", "covers",
           "extract"]
