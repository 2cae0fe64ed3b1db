"""Writing results: the run folder, the Chrome trace and the plotly report."""
