import sys

from latentsync.cli import main

sys.exit(main())
