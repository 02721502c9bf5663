"""Helpers for testing ghostify on real models: the model-zoo sweep and a CNN trained on digits.

Not imported by ``import ghostify``; they need the optional test dependencies (torchvision, timm,
scikit-learn). ``zoo_jobs`` says which models a sweep runs, ``zoo_cases`` builds each one with
inputs it accepts, ``zoo_checks`` converts and checks it, ``runner`` isolates every model in a
worker process, ``coverage`` renders the results as docs/coverage.md; ``digits`` trains the CNN.
"""
