"""mixcls: competition-grade image classification on timm, albumentations and torch."""

__version__ = "0.1.0"
