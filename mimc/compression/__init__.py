"""Torch-level compression stages (an Encoder in, a new Encoder out), one module per technique,
found through :mod:`mimc.compression.registry`."""
