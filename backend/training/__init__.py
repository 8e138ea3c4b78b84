"""Training the project's downstream classifier from its labels (see classifier.py for the losses)."""

TRAINING_LOSSES = ("weighted", "act", "plain")  # the downstream classifier's losses, by name (classifier.py)
