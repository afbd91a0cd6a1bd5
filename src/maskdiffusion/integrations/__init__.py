"""Adapters to other frameworks' data pipelines; each lives in its own module, behind its own extra.

Importing this package imports none of them (their frameworks are optional dependencies):

* :mod:`maskdiffusion.integrations.ray`: offline batch inference with Ray Data
  (``pip install 'maskdiffusion[ray]'``).
"""
