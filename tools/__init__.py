"""Scripts that build or train the models this repository ships (`python -m tools.<name>`)."""
