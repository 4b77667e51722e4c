import sys

from edgeft.cli.app import main

sys.exit(main())
