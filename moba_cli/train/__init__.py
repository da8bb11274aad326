"""Training: recipes (:mod:`.config`), the model (:mod:`.model`), the loop (:mod:`.loop`), checkpoints,
multi-GPU (:mod:`.distributed`), sweeps and scaling-law fits (:mod:`.sweep`, :mod:`.fit`)."""
