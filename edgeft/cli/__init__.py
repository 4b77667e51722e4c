"""Command-line parsing: flags and --config -> one EdgeftConfig -> one library call.
The top: may import every package below; nothing imports it but edgeft.__main__.
"""
from edgeft.cli.app import main  # noqa: F401 - the console script of installs made before the sub-packages
