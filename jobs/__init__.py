"""Thin Hydra entry points over ``asd``; importing the package registers the stage schemas."""

from jobs import schema as _schema

_schema.register()
