"""Sub-commands of the ``localdiff`` CLI; each module has ``register(subparsers)`` setting ``func``."""

COMMANDS = ["sample", "fields", "study", "evaluate", "experiment", "train_unet", "calibrate", "calibrate_masked"]
