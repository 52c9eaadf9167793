"""The layout planner, ``python -m megawan.plan`` (docs/scaling.md): ``planner`` (layouts, ranking, explanation),
``comm`` (bytes per collective and link), ``hardware`` (rates: measured, stated, and the untested overlap)."""
