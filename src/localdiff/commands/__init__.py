"""Sub-commands of the ``localdiff`` CLI; each module has ``register(subparsers)`` setting ``func``."""

COMMANDS = ["sample", "fields", "study", "evaluate", "experiment", "train_unet", "calibrate", "calibrate_masked",
            "convert_network", "probe", "pack", "noise"]

# Commands that run in one process only: under torchrun with more than one process they stop with this reason.
SINGLE_PROCESS = {"experiment": "it trains and analyses its own U-Nets on several synthetic sets in turn",
                  "probe": "it computes every pixel's exact field in one process (its statistics are small); run it "
                           "without torchrun"}
