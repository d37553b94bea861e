"""One module per notebook: the stages of each paper's pipeline as plain functions."""
