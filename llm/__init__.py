"""drosim.llm: DRO-REBEL for transformer policies (installed as ``drosim.llm``).

This folder lives at the top of the repository, as the project's layout asks, and installs
under drosim because the top-level name ``llm`` belongs to another PyPI distribution. Every
robust aggregation used here comes from :mod:`drosim.dro`; none is re-implemented.

The layout, lowest first (a sub-package imports only from its own level or the ones above it
in this list; tests/test_import_layers.py checks it):

- :mod:`drosim.llm.components`: the parts of a training run, small and tested one by one
  (log-probabilities, losses, methods, the robust objective, the update, sharding, rollouts,
  rewards, evaluation, LoRA, the runtime, checkpoints, the run's configuration with its
  sections and generated docs, and the tiny demo world the prompt stream can draw from);
- :mod:`drosim.llm.recipes`: whole runs built from the components: the online trainer, the
  stage-0 recipes on ``transformers``' Trainer (SFT, a classifier reward), the export of a run
  as a Hugging Face folder, the offline demo and the run reports;
- :mod:`drosim.llm.studies`: studies made of many recipe runs (the minority study:
  heterogeneous annotators on the demo);
- :mod:`drosim.llm.cli`: the ``drosim-llm`` command;
- ``configs/``: the bundled run configurations (YAML, package data).
"""
