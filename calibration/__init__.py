"""Scanner calibration: profiles, dark/gain/bad-pixel correction and conditioning of raw frames."""
