"""Data: image decoding, the one preprocessing definition, dataset layouts, demo data.

Torch-free on purpose: the deployed runtime uses :mod:`data.io` and :mod:`data.preprocess`, and
the training side feeds :class:`data.folder.ImageDataset` (a plain map-style dataset) to a torch
``DataLoader``.
"""
