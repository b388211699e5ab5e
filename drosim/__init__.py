"""drosim: distributionally robust REBEL, from exact duals to transformer policies.

The robust aggregations live in :mod:`drosim.dro` and are re-exported here.
"""

from importlib.metadata import PackageNotFoundError, version

from drosim import dro
from drosim.dro import *  # noqa: F403  (the public API of drosim.dro, listed in its __all__)

try:
    __version__ = version("drosim")  # the one version number: pyproject.toml's
except PackageNotFoundError:  # imported from a source tree that is not installed
    __version__ = "0+unknown"
__all__ = list(dro.__all__)
