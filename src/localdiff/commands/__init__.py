"""Sub-commands of the ``localdiff`` CLI; each module has ``register(subparsers)`` setting ``func``."""

COMMANDS = ["sample", "fields", "train_unet", "calibrate"]
