"""Diagnostics that explain a norm x optimizer interaction: norm-layer saturation and scale
blindness, weight spectral norms, the spectrum Newton-Schulz receives, tail-token loss."""
