"""The baseline search (Tan & Le 2019, section 4): MnasNet's space, the paper's objective, three
search algorithms and many workers on one Optuna store. docs/search.md describes it;
experiments/baseline_search.py runs it.

Optuna (the store) is an optional dependency, `pip install 'efficientnet-jax[search]'`, imported
only by `driver.py`'s functions; the space, objective and algorithms need only JAX and optax.
"""
