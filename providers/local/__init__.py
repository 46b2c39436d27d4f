"""The local provider: every service on one machine, each region under its own root."""
