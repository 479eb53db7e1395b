"""vppo: the fused VPPO loss (Visually-Perceptive Policy Optimization) of the vppo crate.

The PyTorch entry point is :mod:`vppo.torch` (``import vppo.torch as vt``); :mod:`vppo.easyr1` is the
official (EasyR1) VPPO update as one call of it. This package imports nothing of torch until one of
those modules is imported.
"""

__version__ = "0.1.0"
