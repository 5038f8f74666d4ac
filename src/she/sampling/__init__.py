"""Which prompts RL trains on: difficulty band (difficulty.py), diverse selection and path diversity
(diverse.py), multi-stage curriculum (curriculum.py). See docs/sampling.md. Submodules are imported
explicitly so that ``import she.sampling`` stays free of torch/transformers."""
