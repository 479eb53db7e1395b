"""vppo: the fused VPPO loss (Visually-Perceptive Policy Optimization) of the vppo crate.

The PyTorch entry point is :mod:`vppo.torch` (``import vppo.torch as vt``); this package imports
nothing of torch until that module is imported.
"""

__version__ = "0.1.0"
