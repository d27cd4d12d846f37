"""/v1/files: training data uploads."""
