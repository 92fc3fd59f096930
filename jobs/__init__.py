"""Thin Hydra entry points over ``asd`` (``jobs.schema`` holds the stage configs' schemas)."""
