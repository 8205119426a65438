"""Built-in collector plugins, registered through the ``rbee.collectors`` entry points."""
