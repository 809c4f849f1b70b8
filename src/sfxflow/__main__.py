import sys

from sfxflow.cli import main

sys.exit(main())
