import sys

from sfxflow.cli import command

sys.exit(command())
