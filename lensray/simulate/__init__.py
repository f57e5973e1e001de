"""The challenge-format simulator (lenstronomy): scenes, rendering, catalogue measures, the writer."""
