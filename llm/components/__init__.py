"""The parts of a training run, each small, pure where it can be, and tested on its own.

- :mod:`~drosim.llm.components.logprobs`: batched masked sequence log-probabilities;
- :mod:`~drosim.llm.components.losses`: the pointwise REBEL, DPO and IPO losses;
- :mod:`~drosim.llm.components.methods`: every method as one pointwise loss times one
  ambiguity set;
- :mod:`~drosim.llm.components.objective`: the robust objective (global over data-parallel
  ranks) and the batched Wasserstein input-gradient norms;
- :mod:`~drosim.llm.components.update`: one optimiser step;
- :mod:`~drosim.llm.components.sharding`: FSDP2 sharding of the policy (gradients summed over
  ranks);
- :mod:`~drosim.llm.components.runtime`: process group, devices, seeding, signal handling,
  metrics log and the collectives, shared by the trainer and the stage-0 recipes;
- :mod:`~drosim.llm.components.rollout`, :mod:`~drosim.llm.components.rollout_engines`: sampling
  pairs, and the engines that sample them;
- :mod:`~drosim.llm.components.rewards`, :mod:`~drosim.llm.components.evaluation`:
  multi-objective rewards, evaluation under reward mixtures;
- :mod:`~drosim.llm.components.batch`, :mod:`~drosim.llm.components.data`: the pair batch and
  the prompt stream; :mod:`~drosim.llm.components.demo_world`: the built-in tiny world;
- :mod:`~drosim.llm.components.lora`: LoRA adapters through PEFT;
- :mod:`~drosim.llm.components.checkpoint`: saving and resuming a run;
- :mod:`~drosim.llm.components.config`, :mod:`~drosim.llm.components.config_sections`,
  :mod:`~drosim.llm.components.config_docs`: the run's configuration, its keys by section,
  and the docs generated from them. The configuration sits here, not with the recipes,
  because components read it (the rollout engines take their settings from it).
"""
