"""HTTP relevance service: ``she serve`` (FastAPI + uvicorn, installed with ``pip install 'she[serve]'``).

Submodules import fastapi lazily so ``import she.serving`` works without the extra; the model-free
parts (:mod:`she.serving.batcher`, :mod:`she.serving.metrics`) need nothing beyond the standard library.
"""
