"""dog: the command-line interface to a sheep cluster."""
