"""lensray: strong-lens finding in Euclid-like cutouts with CNNs, scaled out on Ray."""

__version__ = "0.1.0"
