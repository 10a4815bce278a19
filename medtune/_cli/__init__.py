"""The ``medtune`` command line: ``ls``, ``cp``, ``cat``, ``validate``, ``run`` (and ``score``).

Entry point: :func:`medtune._cli.main.main` (console script ``medtune``, or
``python -m medtune._cli.main``). Recipes and configs are found by :mod:`medtune._cli.registry`.
Importing this package is cheap: no torch, torchtune or omegaconf.
"""
