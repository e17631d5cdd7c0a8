"""The parent-model generator and the rules that combine workers' gradients."""
