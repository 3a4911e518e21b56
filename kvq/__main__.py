import sys

from kvq.cli import main

sys.exit(main())
