"""fastkd benchmarks (not tests): providers side by side in one process, results to CSV."""
