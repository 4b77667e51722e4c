"""`edgeft search`: candidates measured untrained, trained by halving, shipped, chosen (docs/search.md).
Above pipeline/ (each candidate runs through it), below cli/; space, choose and trials are TF-free."""
