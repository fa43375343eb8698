"""sheepdog: a Sheepdog-style distributed block store for virtual machines."""

__version__ = "0.1.0"
