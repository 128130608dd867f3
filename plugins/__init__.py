"""ngkit's built-in plugins, one per module, each listed under [project.entry-points.ngkit]."""
