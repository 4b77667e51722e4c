"""Command-line parsing: flags and --config -> one EdgeftConfig -> one library call.
The top: may import every package below; nothing imports it but edgeft.__main__.
"""
