"""Other tools' APIs on kdkit's core, so their users' scripts run with one import changed.

- :mod:`kdkit.compat.modelopt`: ModelOpt's ``mtd.convert`` / ``mtd.export`` and its losses
  and balancer (``import kdkit.compat.modelopt as mtd``).
- :mod:`kdkit.compat.darklight`: ``StudentTrainer``, ``ImageNetManager``, ``exportonnx``
  (``import kdkit.compat.darklight as dl``).
- :mod:`kdkit.compat.distiller_args`: Intel Distiller's ``--kd-*`` argparse flags.

This package imports the core (``kdkit.distiller``, ``kdkit.train``, ...); nothing in the core
imports it. ``kdkit.StudentTrainer`` and ``kdkit.add_distillation_args`` (the top-level names of
the first release) still resolve, with a ``KDDeprecationWarning`` naming this package.
"""

from kdkit.compat.darklight import ImageNetManager, StudentTrainer, UnlabeledImageManager
from kdkit.compat.distiller_args import KDPolicy, add_distillation_args, distillation_from_args

__all__ = [
    "StudentTrainer",
    "ImageNetManager",
    "UnlabeledImageManager",
    "add_distillation_args",
    "distillation_from_args",
    "KDPolicy",
]
