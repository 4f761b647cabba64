"""Networks from elsewhere, read safely: the paper's U-Net (paper_unet) and EDM's networks (edm/)."""
