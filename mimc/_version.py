"""mimc's version, in a module of its own so that low layers (artifact) read it without importing the package API."""
__version__ = "0.1.0"
