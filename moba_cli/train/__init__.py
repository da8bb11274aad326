"""Training: datasets (``data*`` modules: ``moba data build`` and the packed loader) and the training loop.

Submodules are imported on use; this package imports nothing heavy itself.
"""
