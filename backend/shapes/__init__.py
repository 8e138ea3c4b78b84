"""The shapes world: synthetic images with full ground truth, so label quality is measured here instead of assumed."""
