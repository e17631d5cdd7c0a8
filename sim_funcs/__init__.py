"""The child trainer: a persistent libEnsemble simulator that streams gradients."""
