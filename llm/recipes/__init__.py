"""Whole runs built from :mod:`drosim.llm.components`.

- :mod:`~drosim.llm.recipes.trainer`: the online DRO-REBEL loop;
- :mod:`~drosim.llm.recipes.sft`, :mod:`~drosim.llm.recipes.reward_training`: the stage-0
  recipes on ``transformers``' Trainer (the starting policy, a classifier reward), sharing
  :mod:`~drosim.llm.recipes.stage0`;
- :mod:`~drosim.llm.recipes.export`: a run as a Hugging Face folder;
- :mod:`~drosim.llm.recipes.demo`: the offline demo on the tiny world;
- :mod:`~drosim.llm.recipes.report`: run reports.
"""
