"""Training: the candidate loop, the weight-sharing supernet and its Ray Train job."""
