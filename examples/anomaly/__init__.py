"""Semi-supervised anomaly detection (Deep SAD) with the base optimizer, SAM, ImbSAM."""
