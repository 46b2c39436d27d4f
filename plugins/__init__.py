"""Built-in plugins that are not clouds: lifecycle hooks, notifications, metrics."""
