"""``python -m biaslab …`` (also under ``torchrun -m biaslab``): the command line."""
from .cli import main

main()
