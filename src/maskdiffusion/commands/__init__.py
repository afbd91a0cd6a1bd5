"""The command layer: one module per ``maskdiffusion`` sub-command, the flags they share in ``options``.

Each command parses its flags into a :class:`~maskdiffusion.Preset` and the engine's arguments
and calls the engine (the pipeline, :mod:`~maskdiffusion.evaluation`, the web app, the toy-world
gate). Engines never import from here.
"""
