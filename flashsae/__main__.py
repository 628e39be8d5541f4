"""``python -m flashsae`` (also what ``torchrun -m flashsae`` runs): the command line."""
import sys

from .sae.cli import main

sys.exit(main())
