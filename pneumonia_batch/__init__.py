"""Batch pneumonia screening of chest X-ray studies with a DenseNet-121 classifier."""

__version__ = "0.1.0"
