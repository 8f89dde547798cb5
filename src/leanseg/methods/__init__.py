"""Methods that transform a model or its training (see shared/DESIGN.md, "methods as plug-ins").

Each method is a function that rewrites modules in place, a module, a loss term or a callback;
none forks the training loop. ``backrazor.apply(model, ratio=0.7)`` is the first.
Importing this package registers each method's checkpoint hook
(:func:`leanseg.checkpoint.register_rebuild`); ``model_from_checkpoint`` imports it by name
(``leanseg.checkpoint.REBUILD_PROVIDERS``).
"""

from leanseg.methods import acosp, backrazor

__all__ = ["acosp", "backrazor"]
