"""Data: image decoding, the one preprocessing definition, dataset layouts, demo data.

Torch-free on purpose: the deployed runtime uses :mod:`anomaly.data.io` and :mod:`anomaly.data.preprocess`, and
the training side feeds :class:`anomaly.data.folder.ImageDataset` (a plain map-style dataset) to a torch
``DataLoader``.
"""
