"""Compression techniques, one module each, found through :mod:`mimc.compress.registry`.

DESIGN names both this package and the public verb ``mimc.compress(encoder, config, batches)``.
Importing any submodule makes Python set ``mimc.compress`` to this package, which would shadow a
plain function of that name; so the package itself is callable and forwards to the verb.
"""
from __future__ import annotations

import sys
import types


class _CallablePackage(types.ModuleType):
    def __call__(self, encoder, config, calibration_batches=None):
        from .registry import compress

        return compress(encoder, config, calibration_batches)


sys.modules[__name__].__class__ = _CallablePackage
