"""Studies made of many recipe runs: :mod:`~drosim.llm.studies.minority_study`
(heterogeneous annotators on the demo)."""
