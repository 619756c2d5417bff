"""Fitted on good images after training: thresholds, score normalisation and reduced-precision variants."""
