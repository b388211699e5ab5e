"""drosim.llm: DRO-REBEL for transformer policies (installed as ``drosim.llm``).

This folder lives at the top of the repository, as the project's layout asks, and installs
under drosim because the top-level name ``llm`` belongs to another PyPI distribution. Every
robust aggregation used here comes from :mod:`drosim.dro`; none is re-implemented.
"""
