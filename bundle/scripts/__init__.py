"""The IGReg bundle's code. Importing it installs the one-line error report (see `scripts.errors`)."""
from scripts.errors import install as _install_error_report

_install_error_report()
