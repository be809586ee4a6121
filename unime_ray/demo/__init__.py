"""Scaffolding of the offline demo and the tests: the emoji / synthetic-shapes datasets (:mod:`.data`) and tiny
random-weight checkpoints of the real architectures (:mod:`.tiny`). The pipeline plugs them in where the config
asks (``data.source: emoji | synthetic``, ``models.tiny.make``); nothing else depends on them."""
