"""Training: the data feed, the plain-torch loop, Ray Train and Ray Tune."""
