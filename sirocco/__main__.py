import sys

from sirocco.cli import main

sys.exit(main())
