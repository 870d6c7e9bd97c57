"""medpeft_monai.

Importing the package (every bundle config does) adds :func:`medpeft_monai.utils.install_root_cause_hook`'s hook to
``sys.excepthook``: after Python's usual traceback of an uncaught error, the first error of the chain (the
cause, e.g. a missing file and its fix) is printed again as the last lines, below MONAI's generic "Failed to
evaluate ConfigExpression".
"""

from medpeft_monai.utils import install_root_cause_hook

install_root_cause_hook()
