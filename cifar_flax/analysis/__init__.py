"""Analysis outputs: dataset statistics and plots (EDA) and the end-of-run report."""
