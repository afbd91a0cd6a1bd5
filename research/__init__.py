"""How the bundled toy-world model was made: training, probing and sampling (not installed).

The package keeps what users run (``maskdiffusion.toyworld.world`` makes the scenes, the
gate and ``maskdiffusion demo`` use them); this folder beside it holds the research code
that trained the model in ``src/maskdiffusion/models/toy``. Run from the repository root:
``python -m research.train``, ``python -m research.probe``, ``python -m research.sample``.
CI tests it (``tests/test_toyworld_train.py``, ``tests/test_toyworld_sample.py``); the
wheel leaves it out (setuptools finds packages under ``src/`` only).
"""
