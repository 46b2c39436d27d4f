"""Built-in providers. Each registers through the ``regionvault`` entry-point group."""
