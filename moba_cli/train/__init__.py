"""Training: datasets (``data*`` modules: ``moba data build`` and the packed loader), recipes (:mod:`.config`),
the model (:mod:`.model`), the loop (:mod:`.loop`), checkpoints, multi-GPU (:mod:`.distributed`), sweeps and
scaling-law fits (:mod:`.sweep`, :mod:`.fit`).

Submodules are imported on use; this package imports nothing heavy itself.
"""
