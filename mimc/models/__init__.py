"""Canonical encoder and converters into it."""
