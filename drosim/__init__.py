"""drosim: distributionally robust REBEL, from exact duals to transformer policies.

The robust aggregations live in :mod:`drosim.dro` and are re-exported here.
"""

from drosim import dro
from drosim.dro import *  # noqa: F403  (the public API of drosim.dro, listed in its __all__)

__version__ = "0.1.0"
__all__ = list(dro.__all__)
