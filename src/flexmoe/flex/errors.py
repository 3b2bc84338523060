"""Errors of the FLEx core, each naming what is wrong and how to fix it."""


class FlexError(ValueError):
    """FLEx cannot proceed with this input (no calibration tokens, selections that do not fit the
    model, a model grafted twice, ...)."""


class PersonalStateMismatchError(FlexError):
    """A saved personal state does not fit this model (another base model, or another layout of
    MoE layers, experts or grafts)."""
