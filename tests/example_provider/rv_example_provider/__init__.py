"""flatdir: an example regionvault provider, kept small and real.

Compute, keys and transit are the local provider's services; the vault is this package's own
(:mod:`rv_example_provider.vault`), one flat directory per region.
"""
