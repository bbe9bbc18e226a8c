"""The package version, in one place: the package face, the CLI's ``--version`` and setup.py
(which reads this file as text: importing the package needs torch) all take it from here."""

__version__ = "0.1.0"
