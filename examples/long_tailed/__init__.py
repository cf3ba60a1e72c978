"""Long-tailed classification: SGD, SAM and ImbSAM compared per Many/Medium/Few."""
