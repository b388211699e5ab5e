"""drosim.llm: DRO-REBEL for transformer policies (installed as ``drosim.llm``).

This folder lives at the top of the repository, as the project's layout asks, and installs
under drosim because the top-level name ``llm`` belongs to another PyPI distribution. Every
robust aggregation used here comes from :mod:`drosim.dro`; none is re-implemented.

Components (small, pure, tested one by one):

- :mod:`~drosim.llm.logprobs`: batched masked sequence log-probabilities;
- :mod:`~drosim.llm.losses`: the pointwise REBEL, DPO and IPO losses;
- :mod:`~drosim.llm.methods`: every method as one pointwise loss times one ambiguity set;
- :mod:`~drosim.llm.objective`: the robust objective (global over data-parallel ranks) and
  the batched Wasserstein input-gradient norms;
- :mod:`~drosim.llm.update`: one optimiser step;
- :mod:`~drosim.llm.sharding`: FSDP2 sharding of the policy (gradients summed over ranks);
- :mod:`~drosim.llm.runtime`: process group, devices, seeding, signal handling, metrics log
  and the collectives, shared by the trainer and the stage-0 recipes;
- :mod:`~drosim.llm.rollout`, :mod:`~drosim.llm.rewards`, :mod:`~drosim.llm.evaluation`:
  sampling pairs, multi-objective rewards, evaluation under reward mixtures;
- :mod:`~drosim.llm.batch`, :mod:`~drosim.llm.data`: the pair batch and the prompt stream;
- :mod:`~drosim.llm.rollout_engines`, :mod:`~drosim.llm.lora`, :mod:`~drosim.llm.report`:
  the engines that sample rollouts, LoRA adapters through PEFT, and run reports.

Recipes: :mod:`~drosim.llm.trainer` (the online loop, with :mod:`~drosim.llm.config` and
:mod:`~drosim.llm.checkpoint`), :mod:`~drosim.llm.export` (a run as a Hugging Face folder),
:mod:`~drosim.llm.demo` (the offline demo on :mod:`~drosim.llm.demo_world`), the stage-0
recipes on ``transformers``' Trainer (:mod:`~drosim.llm.sft`, the starting policy;
:mod:`~drosim.llm.reward_training`, a classifier reward; shared: :mod:`~drosim.llm.recipes`),
:mod:`~drosim.llm.minority_study` (heterogeneous annotators on the demo) and the
``drosim-llm`` command (:mod:`~drosim.llm.cli`).
"""
