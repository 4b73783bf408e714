"""Per-sample recon / inversion errors, feature statistics (FID/KID), feature extractors."""
