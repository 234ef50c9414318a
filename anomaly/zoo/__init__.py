"""The adversarial/generative model zoo: ``nn.Module`` classes only, one file per family.

Family files register small factories with :func:`anomaly.registry.register_model`; they are
imported lazily by the registry. Training losses live in :mod:`anomaly.training.objectives`.
"""
