"""Training side (needs torch): objectives (losses only), the one trainer loop, configuration."""
