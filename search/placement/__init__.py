"""Step placement by dynamic programming and compass-search polish."""
