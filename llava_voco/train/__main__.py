"""``python -m llava_voco.train ...``: LLaVA's training command line (see ``llava_voco.train.train``)."""

import sys

from .train import cli

sys.exit(cli())
