"""Layers and the early-exit network built from an ``ArchConfig``."""

from .blocks import ConvBNAct, InvertedResidual, SqueezeExcite, make_divisible
from .exits import ExitBranch, ExitModule
from .network import EarlyExitNet

__all__ = ["ConvBNAct", "InvertedResidual", "SqueezeExcite", "make_divisible", "ExitBranch",
           "ExitModule", "EarlyExitNet"]
