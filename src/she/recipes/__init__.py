"""Recipes: the top layer. Experiment drivers that only *orchestrate* the library below them -- ``she compare``
(:mod:`she.recipes.compare`), the ``she demo`` pipeline (:mod:`she.recipes.demo`) and the drivers of the
sampling commands ``she data filter|diverse`` and ``she train curriculum`` (:mod:`she.recipes.sampling`).
Nothing below imports from here (docs/design.md, "Layers")."""
