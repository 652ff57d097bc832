"""Sampling and completion: one generation loop over sub-pixels for every architecture, and sample grids."""
