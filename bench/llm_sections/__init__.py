"""The sections of ``bench/bench_llm.py`` (see its docstring), one module each.

``common`` holds the settings, the models and the synthetic batches every section uses,
``timing`` the clocks and the step runner; ``steps``, ``penalty``, ``logprobs``, ``memory``
and ``generation`` are sections 1 to 5, ``report`` writes the tables.
"""
