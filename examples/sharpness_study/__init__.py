"""Per-class sharpness (top Hessian eigenvalue, trace) of long-tailed runs."""
