"""``data.*`` of the DPO stage: defined, with its defaults and checks, in :mod:`stllava_med.schema`."""

from stllava_med.schema import PreferenceDataSettings

__all__ = ["PreferenceDataSettings"]
